//! Invites: how two people become contacts without a server.
//!
//! ```text
//! xmpp:NAME@<onion>.onion?coterie-invite;v=1;id=<16 B>;s=<32 B>;exp=<unix>;addr=tcp:…;addr=quic:…;sig=<64 B>
//! ```
//!
//! * The inviter's key is the onion address itself (rend-spec-v3 encoding).
//! * `id` names the invite; `s` is a one-time secret; both are random.
//! * `sig` is the inviter's Ed25519 signature over everything before `;sig=`,
//!   so addresses and expiry cannot be altered in transit.
//! * The invitee proves knowledge of `s` with [`redeem_proof`], bound to both
//!   keys and to the TLS connection (exporter), so a proof seen once is
//!   useless anywhere else. The inviter then pins the invitee's key.
//!
//! Binary fields are unpadded base32 (lowercase), like the onion address.
//! Values are percent-encoded where needed.

use data_encoding::BASE32_NOPAD;
use hmac::{Mac, SimpleHmac};
use transport::{PeerAddr, PeerId, SecretKey};

const SCHEME: &str = "xmpp:";
const ACTION: &str = "coterie-invite";
const MAX_URI: usize = 2048;
const MAX_NAME: usize = 64;
const MAX_ADDRS: usize = 8;

/// A parsed, signature-checked invite.
#[derive(Clone, PartialEq, Eq)]
pub struct Invite {
    /// The inviter's display name (a hint; the user may rename).
    pub name: String,
    /// The inviter's key.
    pub inviter: PeerId,
    /// Invite id.
    pub id: [u8; 16],
    /// One-time secret.
    pub secret: [u8; 32],
    /// Expiry, unix seconds.
    pub expires: u64,
    /// Where the inviter listens.
    pub addrs: Vec<PeerAddr>,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Invite(from {}, {} addrs)",
            self.inviter.short(),
            self.addrs.len()
        )
    }
}

/// Why an invite was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    /// Not a Coterie invite at all.
    #[error(
        "this is not a Coterie invite link (it should start with xmpp: and contain ?coterie-invite)"
    )]
    NotAnInvite,
    /// Too long to be an invite.
    #[error("the invite link is too long ({0} bytes)")]
    TooLong(usize),
    /// A field is missing or malformed.
    #[error(
        "the invite link is damaged: field `{0}` is missing or malformed (ask for a new invite)"
    )]
    BadField(&'static str),
    /// The onion address in it is invalid.
    #[error("the invite's address is invalid: {0}")]
    BadAddress(#[from] transport::PeerIdError),
    /// The signature does not match: the link was altered.
    #[error(
        "the invite link was altered or forged (signature does not match); ask the sender for a new one"
    )]
    BadSignature,
    /// Expired.
    #[error("the invite expired; ask the sender for a new one")]
    Expired,
    /// An invite from ourselves.
    #[error("this invite is your own")]
    OwnInvite,
}

fn b32(b: &[u8]) -> String {
    BASE32_NOPAD.encode(b).to_ascii_lowercase()
}

fn un_b32<const N: usize>(s: &str, field: &'static str) -> Result<[u8; N], InviteError> {
    let v = BASE32_NOPAD
        .decode(s.to_ascii_uppercase().as_bytes())
        .map_err(|_| InviteError::BadField(field))?;
    v.try_into().map_err(|_| InviteError::BadField(field))
}

/// Percent-encodes everything but unreserved characters and `:`.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unpct(s: &str, field: &'static str) -> Result<String, InviteError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(InviteError::BadField(field))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| InviteError::BadField(field))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| InviteError::BadField(field))
}

/// Checks a display name: non-empty, at most 64 bytes, no control characters, no `@` or `/`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name
            .chars()
            .any(|c| c.is_control() || matches!(c, '@' | '/' | '"' | '\'' | '<' | '>' | '&'))
}

impl Invite {
    /// Creates and signs an invite URI.
    pub fn issue(
        key: &SecretKey,
        name: &str,
        id: [u8; 16],
        secret: [u8; 32],
        expires: u64,
        addrs: &[PeerAddr],
    ) -> String {
        let mut uri = format!(
            "{SCHEME}{}@{}?{ACTION};v=1;id={};s={};exp={expires}",
            pct(name),
            key.peer_id().onion_address(),
            b32(&id),
            b32(&secret)
        );
        for a in addrs.iter().take(MAX_ADDRS) {
            uri.push_str(";addr=");
            uri.push_str(&pct(&a.to_string()));
        }
        let sig = key.sign(uri.as_bytes());
        uri.push_str(";sig=");
        uri.push_str(&b32(&sig));
        uri
    }

    /// Parses and verifies an invite URI, checking expiry against `now`.
    pub fn parse(uri: &str, now: u64) -> Result<Invite, InviteError> {
        let uri = uri.trim();
        if uri.len() > MAX_URI {
            return Err(InviteError::TooLong(uri.len()));
        }
        let rest = uri.strip_prefix(SCHEME).ok_or(InviteError::NotAnInvite)?;
        let (jid, query) = rest.split_once('?').ok_or(InviteError::NotAnInvite)?;
        let (signed, sig) = uri
            .rsplit_once(";sig=")
            .ok_or(InviteError::BadField("sig"))?;
        let mut parts = query.split(';');
        if parts.next() != Some(ACTION) {
            return Err(InviteError::NotAnInvite);
        }
        let (name, onion) = jid.split_once('@').ok_or(InviteError::BadField("jid"))?;
        let name = unpct(name, "name")?;
        if !valid_name(&name) {
            return Err(InviteError::BadField("name"));
        }
        let inviter = PeerId::from_onion(onion)?;
        let sig: [u8; 64] = un_b32(sig, "sig")?;
        if !inviter.verify(signed.as_bytes(), &sig) {
            return Err(InviteError::BadSignature);
        }
        let (mut v, mut id, mut secret, mut exp, mut addrs) = (None, None, None, None, Vec::new());
        for p in parts {
            let (k, val) = p.split_once('=').ok_or(InviteError::BadField("query"))?;
            match k {
                "v" => v = Some(val),
                "id" => id = Some(un_b32::<16>(val, "id")?),
                "s" => secret = Some(un_b32::<32>(val, "s")?),
                "exp" => {
                    exp = Some(
                        val.parse::<u64>()
                            .map_err(|_| InviteError::BadField("exp"))?,
                    )
                }
                "addr" if addrs.len() < MAX_ADDRS => {
                    let a = unpct(val, "addr")?;
                    addrs.push(
                        a.parse::<PeerAddr>()
                            .map_err(|_| InviteError::BadField("addr"))?,
                    );
                }
                "addr" => return Err(InviteError::BadField("addr")),
                "sig" => {}
                _ => {} // Unknown fields are covered by the signature; ignore them.
            }
        }
        if v != Some("1") {
            return Err(InviteError::BadField("v"));
        }
        let expires = exp.ok_or(InviteError::BadField("exp"))?;
        if expires <= now {
            return Err(InviteError::Expired);
        }
        Ok(Invite {
            name,
            inviter,
            id: id.ok_or(InviteError::BadField("id"))?,
            secret: secret.ok_or(InviteError::BadField("s"))?,
            expires,
            addrs,
        })
    }
}

/// The invitee's proof that it holds the invite secret, bound to both keys
/// and to one TLS connection.
pub fn redeem_proof(
    secret: &[u8; 32],
    inviter: &PeerId,
    invitee: &PeerId,
    channel_binding: &[u8; 32],
) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut m = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(secret)
        .expect("HMAC takes any key length");
    m.update(b"coterie invite redemption v1");
    m.update(inviter.as_bytes());
    m.update(invitee.as_bytes());
    m.update(channel_binding);
    m.finalize().into_bytes().into()
}

/// Checks a redemption proof in constant time.
pub fn check_proof(
    secret: &[u8; 32],
    inviter: &PeerId,
    invitee: &PeerId,
    channel_binding: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    use subtle::ConstantTimeEq;
    redeem_proof(secret, inviter, invitee, channel_binding)
        .ct_eq(proof)
        .into()
}

/// Parses a duration like `7d`, `12h`, `30m`, `90s` into seconds.
pub fn parse_ttl(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(key: &SecretKey) -> String {
        Invite::issue(
            key,
            "Alice Smith",
            [1; 16],
            [2; 32],
            1000,
            &[
                "tcp:127.0.0.1:5000".parse().expect("addr"),
                "quic:[::1]:5000".parse().expect("addr"),
            ],
        )
    }

    #[test]
    fn roundtrip() {
        let k = SecretKey::generate();
        let uri = sample(&k);
        assert!(uri.starts_with("xmpp:Alice%20Smith@"));
        let inv = Invite::parse(&uri, 10).expect("parses");
        assert_eq!(inv.name, "Alice Smith");
        assert_eq!(inv.inviter, k.peer_id());
        assert_eq!(inv.secret, [2; 32]);
        assert_eq!(inv.addrs.len(), 2);
        assert_eq!(inv.addrs[1].to_string(), "quic:[::1]:5000");
    }

    #[test]
    fn expired_is_refused() {
        let k = SecretKey::generate();
        assert_eq!(Invite::parse(&sample(&k), 1000), Err(InviteError::Expired));
    }

    #[test]
    fn any_alteration_breaks_the_signature() {
        let k = SecretKey::generate();
        let uri = sample(&k);
        let altered = uri.replace("5000", "5001");
        assert_eq!(Invite::parse(&altered, 10), Err(InviteError::BadSignature));
        let altered = uri.replace("exp=1000", "exp=9999");
        assert_eq!(Invite::parse(&altered, 10), Err(InviteError::BadSignature));
        // Re-signing with another key changes the onion address, so the
        // forger's invite names the forger, not the victim.
        let other = SecretKey::generate();
        let (signed, _) = altered.rsplit_once(";sig=").expect("sig");
        let forged = format!("{signed};sig={}", b32(&other.sign(signed.as_bytes())));
        assert_eq!(Invite::parse(&forged, 10), Err(InviteError::BadSignature));
    }

    #[test]
    fn garbage_is_not_an_invite() {
        assert_eq!(
            Invite::parse("https://example.org", 0),
            Err(InviteError::NotAnInvite)
        );
        assert_eq!(
            Invite::parse("xmpp:a@b?roster", 0),
            Err(InviteError::BadField("sig"))
        );
        assert!(matches!(
            Invite::parse(&"x".repeat(5000), 0),
            Err(InviteError::TooLong(_))
        ));
    }

    #[test]
    fn proofs_bind_keys_and_connection() {
        let (a, b, c) = (
            SecretKey::generate().peer_id(),
            SecretKey::generate().peer_id(),
            SecretKey::generate().peer_id(),
        );
        let p = redeem_proof(&[5; 32], &a, &b, &[9; 32]);
        assert!(check_proof(&[5; 32], &a, &b, &[9; 32], &p));
        assert!(
            !check_proof(&[5; 32], &a, &c, &[9; 32], &p),
            "another invitee"
        );
        assert!(
            !check_proof(&[5; 32], &a, &b, &[8; 32], &p),
            "another connection"
        );
        assert!(
            !check_proof(&[6; 32], &a, &b, &[9; 32], &p),
            "another secret"
        );
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("7d"), Some(604_800));
        assert_eq!(parse_ttl("90s"), Some(90));
        assert_eq!(parse_ttl("0d"), None);
        assert_eq!(parse_ttl("7"), None);
        assert_eq!(parse_ttl("d"), None);
    }

    #[test]
    fn names() {
        assert!(valid_name("Alice Smith"));
        assert!(valid_name("Zoë"));
        for bad in ["", "a@b", "a/b", "a\nb", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn issue_parse_roundtrip(name in "[\\p{L}\\p{N} ._-]{1,30}", id in any::<[u8; 16]>(), secret in any::<[u8; 32]>(), exp in 1u64..u64::MAX, port in any::<u16>()) {
            prop_assume!(valid_name(&name));
            let k = SecretKey::generate();
            let addrs = vec![PeerAddr::Tcp(([127, 0, 0, 1], port).into())];
            let uri = Invite::issue(&k, &name, id, secret, exp, &addrs);
            let inv = Invite::parse(&uri, 0).expect("parses");
            prop_assert_eq!(inv.name, name);
            prop_assert_eq!(inv.id, id);
            prop_assert_eq!(inv.secret, secret);
            prop_assert_eq!(inv.expires, exp);
            prop_assert_eq!(inv.addrs, addrs);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,300}") {
            let _ = Invite::parse(&s, 0);
            let _ = Invite::parse(&format!("xmpp:{s}"), 0);
            let _ = Invite::parse(&format!("xmpp:a@b?coterie-invite;{s};sig=aa"), 0);
        }
    }
}
