//! The XML of XEP-0384 in both versions: device lists, bundles and
//! `<encrypted/>` elements. Parsers bound every count and size and check
//! every key before anything else sees it.

use data_encoding::BASE64;
use minidom::Element;
use rxml::NcName;

use super::{OmemoError, Result, Version, keys, ratchet};

/// At most this many devices are read from a device list.
pub const MAX_DEVICES: usize = 64;
/// At most this many one-time prekeys are read from a bundle.
pub const MAX_PREKEYS: usize = 200;
/// At most this many `<key/>` elements are read from a message.
pub const MAX_KEYS: usize = 128;
/// Largest base64 field accepted (decoded bytes): a key exchange is ~250 bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// An attribute name known to be valid.
pub(crate) fn nc(s: &'static str) -> NcName {
    NcName::try_from(s).unwrap_or_else(|_| unreachable!("constant attribute name"))
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Decodes base64, ignoring whitespace (some clients wrap lines).
pub(crate) fn unb64(text: &str, max: usize, what: &'static str) -> Result<Vec<u8>> {
    let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if clean.len() > max.div_ceil(3) * 4 + 4 {
        return Err(OmemoError::Malformed(what));
    }
    BASE64
        .decode(&clean)
        .map_err(|_| OmemoError::Malformed(what))
}

fn key32(text: &str, v: Version, what: &'static str) -> Result<[u8; 32]> {
    let raw = unb64(text, 64, what)?;
    match v {
        Version::V03 => ratchet::parse_djb(&raw),
        Version::V2 => raw.as_slice().try_into().ok(),
    }
    .ok_or(OmemoError::Malformed(what))
}

fn enc_key(v: Version, k: &[u8; 32]) -> String {
    match v {
        Version::V03 => b64(&ratchet::djb(k)),
        Version::V2 => b64(k),
    }
}

fn id_attr(el: &Element, name: &str, what: &'static str) -> Result<u32> {
    el.attr(name)
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(OmemoError::Malformed(what))
}

fn text_el(name: &str, ns: &str, text: String) -> Element {
    Element::builder(name, ns).append(text).build()
}

/// A device's published keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Which version's bundle.
    pub version: Version,
    /// Identity key, Ed25519 form.
    pub ik: [u8; 32],
    /// Signed prekey id.
    pub spk_id: u32,
    /// Signed prekey.
    pub spk: [u8; 32],
    /// Its signature (for 0.3 with the sign bit cleared).
    pub spk_sig: [u8; 64],
    /// One-time prekeys.
    pub prekeys: Vec<(u32, [u8; 32])>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bundle({}, spk {}, {} prekeys)",
            self.version,
            self.spk_id,
            self.prekeys.len()
        )
    }
}

impl Bundle {
    /// The bundle as the version publishes it.
    pub fn to_element(&self) -> Element {
        let ns = self.version.ns();
        let mut b = Element::builder("bundle", ns);
        match self.version {
            Version::V03 => {
                let mut sig = self.spk_sig;
                sig[63] |= self.ik[31] & 0x80;
                let mont = keys::ed_to_mont(&self.ik).unwrap_or_default();
                b = b
                    .append(
                        Element::builder("signedPreKeyPublic", ns)
                            .attr(nc("signedPreKeyId"), self.spk_id.to_string())
                            .append(enc_key(Version::V03, &self.spk))
                            .build(),
                    )
                    .append(text_el("signedPreKeySignature", ns, b64(&sig)))
                    .append(text_el("identityKey", ns, enc_key(Version::V03, &mont)));
                let mut pks = Element::builder("prekeys", ns);
                for (id, k) in &self.prekeys {
                    pks = pks.append(
                        Element::builder("preKeyPublic", ns)
                            .attr(nc("preKeyId"), id.to_string())
                            .append(enc_key(Version::V03, k))
                            .build(),
                    );
                }
                b.append(pks.build()).build()
            }
            Version::V2 => {
                b = b
                    .append(
                        Element::builder("spk", ns)
                            .attr(nc("id"), self.spk_id.to_string())
                            .append(b64(&self.spk))
                            .build(),
                    )
                    .append(text_el("spks", ns, b64(&self.spk_sig)))
                    .append(text_el("ik", ns, b64(&self.ik)));
                let mut pks = Element::builder("prekeys", ns);
                for (id, k) in &self.prekeys {
                    pks = pks.append(
                        Element::builder("pk", ns)
                            .attr(nc("id"), id.to_string())
                            .append(b64(k))
                            .build(),
                    );
                }
                b.append(pks.build()).build()
            }
        }
    }

    /// Parses and checks a bundle: well-formed keys and a valid signature.
    pub fn parse(el: &Element) -> Result<Bundle> {
        let v = Version::from_ns(&el.ns()).ok_or(OmemoError::Malformed("bundle namespace"))?;
        if el.name() != "bundle" {
            return Err(OmemoError::Malformed("bundle element"));
        }
        let ns = v.ns();
        let child = |name: &'static str| {
            el.get_child(name, ns)
                .ok_or(OmemoError::Malformed("bundle: missing element"))
        };
        let (spk_name, spk_id_attr, sig_name, ik_name, pk_name, pk_id_attr) = match v {
            Version::V03 => (
                "signedPreKeyPublic",
                "signedPreKeyId",
                "signedPreKeySignature",
                "identityKey",
                "preKeyPublic",
                "preKeyId",
            ),
            Version::V2 => ("spk", "id", "spks", "ik", "pk", "id"),
        };
        let spk_el = child(spk_name)?;
        let spk_id = id_attr(spk_el, spk_id_attr, "bundle: signed prekey id")?;
        let spk = key32(&spk_el.text(), v, "bundle: signed prekey")?;
        let sig: [u8; 64] = unb64(&child(sig_name)?.text(), 64, "bundle: signature")?
            .as_slice()
            .try_into()
            .map_err(|_| OmemoError::Malformed("bundle: signature length"))?;
        let (ik, sig) = match v {
            Version::V03 => {
                let mont = key32(&child(ik_name)?.text(), v, "bundle: identity key")?;
                let sign = sig[63] & 0x80 != 0;
                let mut sig = sig;
                sig[63] &= 0x7f;
                let ed = keys::mont_to_ed(&mont, sign)
                    .ok_or(OmemoError::Malformed("bundle: identity key"))?;
                (ed, sig)
            }
            Version::V2 => (
                key32(&child(ik_name)?.text(), v, "bundle: identity key")?,
                sig,
            ),
        };
        let mut prekeys = Vec::new();
        for pk in child("prekeys")?.children().filter(|c| c.is(pk_name, ns)) {
            if prekeys.len() == MAX_PREKEYS {
                break;
            }
            let id = id_attr(pk, pk_id_attr, "bundle: prekey id")?;
            prekeys.push((id, key32(&pk.text(), v, "bundle: prekey")?));
        }
        if prekeys.is_empty() {
            return Err(OmemoError::NoPreKeys);
        }
        keys::verify_spk(v, &ik, &spk, &sig)?;
        Ok(Bundle {
            version: v,
            ik,
            spk_id,
            spk,
            spk_sig: sig,
            prekeys,
        })
    }
}

/// A device list element.
pub fn devices_element(v: Version, ids: &[u32]) -> Element {
    let ns = v.ns();
    let name = match v {
        Version::V03 => "list",
        Version::V2 => "devices",
    };
    let mut b = Element::builder(name, ns);
    for id in ids {
        b = b.append(
            Element::builder("device", ns)
                .attr(nc("id"), id.to_string())
                .build(),
        );
    }
    b.build()
}

/// Parses a device list: the version and the device ids (duplicates and
/// zero dropped, at most [`MAX_DEVICES`]).
pub fn parse_devices(el: &Element) -> Result<(Version, Vec<u32>)> {
    let v = Version::from_ns(&el.ns()).ok_or(OmemoError::Malformed("device list namespace"))?;
    let expect = match v {
        Version::V03 => "list",
        Version::V2 => "devices",
    };
    if el.name() != expect {
        return Err(OmemoError::Malformed("device list element"));
    }
    let mut ids = Vec::new();
    for d in el.children().filter(|c| c.is("device", v.ns())) {
        let id = id_attr(d, "id", "device id")?;
        if id != 0 && !ids.contains(&id) && ids.len() < MAX_DEVICES {
            ids.push(id);
        }
    }
    Ok((v, ids))
}

/// One recipient device's key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyElement {
    /// Recipient bare JID (OMEMO 2 groups keys by JID).
    pub jid: Option<String>,
    /// Recipient device.
    pub rid: u32,
    /// Whether `data` is a key exchange.
    pub kex: bool,
    /// The ratchet message or key exchange.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for KeyElement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Key(rid {}, kex {}, {} bytes)",
            self.rid,
            self.kex,
            self.data.len()
        )
    }
}

/// An `<encrypted/>` element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedElement {
    /// Version.
    pub version: Version,
    /// Sender device.
    pub sid: u32,
    /// One key per recipient device.
    pub keys: Vec<KeyElement>,
    /// 0.3 payload IV.
    pub iv: Option<Vec<u8>>,
    /// The payload; absent in an empty (key transport) message.
    pub payload: Option<Vec<u8>>,
}

impl EncryptedElement {
    /// The element.
    pub fn to_element(&self) -> Element {
        let ns = self.version.ns();
        let mut header = Element::builder("header", ns).attr(nc("sid"), self.sid.to_string());
        let key_el = |k: &KeyElement| {
            let mut b = Element::builder("key", ns).attr(nc("rid"), k.rid.to_string());
            if k.kex {
                b = match self.version {
                    Version::V03 => b.attr(nc("prekey"), "true"),
                    Version::V2 => b.attr(nc("kex"), "true"),
                };
            }
            b.append(b64(&k.data)).build()
        };
        match self.version {
            Version::V03 => {
                for k in &self.keys {
                    header = header.append(key_el(k));
                }
                if let Some(iv) = &self.iv {
                    header = header.append(text_el("iv", ns, b64(iv)));
                }
            }
            Version::V2 => {
                let mut jids: Vec<&str> = Vec::new();
                for k in &self.keys {
                    let j = k.jid.as_deref().unwrap_or_default();
                    if !jids.contains(&j) {
                        jids.push(j);
                    }
                }
                for j in jids {
                    let mut keys = Element::builder("keys", ns).attr(nc("jid"), j);
                    for k in self
                        .keys
                        .iter()
                        .filter(|k| k.jid.as_deref().unwrap_or_default() == j)
                    {
                        keys = keys.append(key_el(k));
                    }
                    header = header.append(keys.build());
                }
            }
        }
        let mut e = Element::builder("encrypted", ns).append(header.build());
        if let Some(p) = &self.payload {
            e = e.append(text_el("payload", ns, b64(p)));
        }
        e.build()
    }

    /// Parses an `<encrypted/>` element of either version.
    pub fn parse(el: &Element, max_payload: usize) -> Result<EncryptedElement> {
        let v = Version::from_ns(&el.ns()).ok_or(OmemoError::Malformed("encrypted namespace"))?;
        if el.name() != "encrypted" {
            return Err(OmemoError::Malformed("encrypted element"));
        }
        let ns = v.ns();
        let header = el
            .get_child("header", ns)
            .ok_or(OmemoError::Malformed("encrypted: header"))?;
        let sid = id_attr(header, "sid", "encrypted: sid")?;
        let flag = |k: &Element, name: &str| matches!(k.attr(name), Some("true" | "1"));
        let mut keys = Vec::new();
        let mut push = |k: &Element, jid: Option<String>, kex: bool| -> Result<()> {
            if keys.len() < MAX_KEYS {
                keys.push(KeyElement {
                    jid,
                    rid: id_attr(k, "rid", "encrypted: rid")?,
                    kex,
                    data: unb64(&k.text(), MAX_KEY_BYTES, "encrypted: key")?,
                });
            }
            Ok(())
        };
        let mut iv = None;
        match v {
            Version::V03 => {
                for k in header.children().filter(|c| c.is("key", ns)) {
                    push(k, None, flag(k, "prekey"))?;
                }
                if let Some(i) = header.get_child("iv", ns) {
                    iv = Some(unb64(&i.text(), 64, "encrypted: iv")?);
                }
            }
            Version::V2 => {
                for ks in header.children().filter(|c| c.is("keys", ns)) {
                    let jid = ks
                        .attr("jid")
                        .filter(|j| j.len() <= 3071)
                        .ok_or(OmemoError::Malformed("encrypted: keys jid"))?
                        .to_string();
                    for k in ks.children().filter(|c| c.is("key", ns)) {
                        push(k, Some(jid.clone()), flag(k, "kex"))?;
                    }
                }
            }
        }
        let payload = match el.get_child("payload", ns) {
            Some(p) => Some(unb64(&p.text(), max_payload, "encrypted: payload")?),
            None => None,
        };
        Ok(EncryptedElement {
            version: v,
            sid,
            keys,
            iv,
            payload,
        })
    }
}
