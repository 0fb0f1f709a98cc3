//! XEP-0420 Stanza Content Encryption envelopes, as OMEMO 2 encrypts them:
//!
//! ```xml
//! <envelope xmlns='urn:xmpp:sce:1'>
//!   <content><body xmlns='jabber:client'>…</body></content>
//!   <rpad>…</rpad>
//!   <from jid='…'/>
//! </envelope>
//! ```

use minidom::Element;
use rand::Rng;
use rxml::NcName;

use super::{OmemoError, Result};

/// XEP-0420 namespace.
pub const NS_SCE: &str = "urn:xmpp:sce:1";
/// Coterie's group traffic inside an envelope (`docs/protocol.md` §7.4).
pub const NS_GROUP: &str = "urn:coterie:group:0";
/// Coterie's offline-delivery traffic inside an envelope (§7.5).
pub const NS_HOLD: &str = "urn:coterie:hold:0";

/// What an envelope carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A chat message's text.
    Body(String),
    /// A group frame (protobuf), base64 in a `<group/>` element.
    Group(Vec<u8>),
    /// A hold frame (protobuf), base64 in a `<hold/>` element.
    Hold(Vec<u8>),
}

impl Content {
    /// The content element.
    pub fn element(&self) -> Element {
        match self {
            Content::Body(b) => Element::builder("body", NS_CLIENT)
                .append(b.as_str())
                .build(),
            Content::Group(f) => Element::builder("group", NS_GROUP)
                .append(data_encoding::BASE64.encode(f))
                .build(),
            Content::Hold(f) => Element::builder("hold", NS_HOLD)
                .append(data_encoding::BASE64.encode(f))
                .build(),
        }
    }

    /// Reads a `<group/>` or `<hold/>` element, as serialized (OMEMO 0.3
    /// carries it as its whole plaintext).
    pub fn frame_from_xml(text: &str) -> Option<Content> {
        if !text.starts_with("<group") && !text.starts_with("<hold") {
            return None;
        }
        let el: Element = text.parse().ok()?;
        frame_of(&el)
    }
}

fn frame_of(el: &Element) -> Option<Content> {
    if el.is("group", NS_GROUP) {
        bytes_of(el).map(Content::Group)
    } else if el.is("hold", NS_HOLD) {
        bytes_of(el).map(Content::Hold)
    } else {
        None
    }
}

fn bytes_of(el: &Element) -> Option<Vec<u8>> {
    if el.children().next().is_some() {
        return None;
    }
    data_encoding::BASE64
        .decode(el.text().trim().as_bytes())
        .ok()
}
/// Most `<` an envelope may contain (start and end tags).
const MAX_TAGS: usize = 32;
const NS_CLIENT: &str = "jabber:client";

/// The envelope for `body` from `from` (a bare JID), serialized. The caller
/// checked that `body` is XML text.
pub fn seal(body: &str, from: &str, rng: &mut impl rand::RngCore) -> Vec<u8> {
    seal_content(&Content::Body(body.to_string()), from, rng)
}

/// The envelope for `content` from `from`, serialized.
pub fn seal_content(content: &Content, from: &str, rng: &mut impl rand::RngCore) -> Vec<u8> {
    // Random padding so the envelope length does not give away the body's.
    let pad_len = rng.gen_range(1..=64usize);
    let rpad: String = (0..pad_len)
        .map(|_| char::from(b'a' + rng.gen_range(0..26u8)))
        .collect();
    let jid = NcName::try_from("jid").unwrap_or_else(|_| unreachable!("constant name"));
    let el = Element::builder("envelope", NS_SCE)
        .append(
            Element::builder("content", NS_SCE)
                .append(content.element())
                .build(),
        )
        .append(Element::builder("rpad", NS_SCE).append(rpad).build())
        .append(Element::builder("from", NS_SCE).attr(jid, from).build())
        .build();
    let mut out = Vec::with_capacity(256);
    // Writing to a Vec only fails on text XML cannot carry (checked by the caller).
    if el.write_to(&mut out).is_err() {
        out.clear();
    }
    out
}

/// Opens an envelope: the body (if any). Its `<from/>` affix must name
/// `expected_from`.
pub fn open(bytes: &[u8], expected_from: &str) -> Result<Option<String>> {
    Ok(match open_content(bytes, expected_from)? {
        Some(Content::Body(b)) => Some(b),
        _ => None,
    })
}

/// Opens an envelope: its body or group frame (if any). Its `<from/>`
/// affix must name `expected_from`.
pub fn open_content(bytes: &[u8], expected_from: &str) -> Result<Option<Content>> {
    let text = std::str::from_utf8(bytes).map_err(|_| OmemoError::Malformed("envelope: UTF-8"))?;
    // An envelope has a handful of elements (the body's text is escaped):
    // refuse anything with more tags, which also bounds nesting depth.
    if text.bytes().filter(|b| *b == b'<').count() > MAX_TAGS {
        return Err(OmemoError::Malformed("envelope: too many elements"));
    }
    let el: Element = text
        .parse()
        .map_err(|_| OmemoError::Malformed("envelope: XML"))?;
    if !el.is("envelope", NS_SCE) {
        return Err(OmemoError::Malformed("envelope element"));
    }
    // OMEMO 2 requires the `<from/>` affix: it binds the content to its sender.
    let from = el
        .get_child("from", NS_SCE)
        .ok_or(OmemoError::Malformed("envelope: no <from/>"))?;
    if !from
        .attr("jid")
        .unwrap_or_default()
        .eq_ignore_ascii_case(expected_from)
    {
        return Err(OmemoError::SenderMismatch);
    }
    let content = el
        .get_child("content", NS_SCE)
        .ok_or(OmemoError::Malformed("envelope: content"))?;
    if let Some(b) = content.get_child("body", NS_CLIENT) {
        return Ok(Some(Content::Body(b.text())));
    }
    match content
        .children()
        .find(|c| c.is("group", NS_GROUP) || c.is("hold", NS_HOLD))
    {
        Some(f) => frame_of(f)
            .map(Some)
            .ok_or(OmemoError::Malformed("envelope: frame")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_check_the_sender() {
        let mut rng = rand::rngs::OsRng;
        let body = "<&> ünïcode 🙂 ]]>";
        let e = seal(body, "a@b.onion", &mut rng);
        assert_eq!(open(&e, "a@b.onion").expect("open").as_deref(), Some(body));
        assert_eq!(open(&e, "c@d.onion"), Err(OmemoError::SenderMismatch));
        assert!(open(b"<x/>", "a@b").is_err());
        let no_from = b"<envelope xmlns='urn:xmpp:sce:1'><content/></envelope>";
        assert!(open(no_from, "a@b").is_err());
        let deep = format!("<envelope xmlns='urn:xmpp:sce:1'>{}", "<x>".repeat(5000));
        assert!(open(deep.as_bytes(), "a@b").is_err());
        assert!(open(b"\xff", "a@b").is_err());
    }

    #[test]
    fn group_frames_travel_in_envelopes_and_alone() {
        let mut rng = rand::rngs::OsRng;
        let frame = vec![0u8, 1, 2, 255, b'<', b'&'];
        let e = seal_content(&Content::Group(frame.clone()), "a@b.onion", &mut rng);
        assert_eq!(
            open_content(&e, "a@b.onion").expect("open"),
            Some(Content::Group(frame.clone()))
        );
        // Not a body.
        assert_eq!(open(&e, "a@b.onion").expect("open"), None);
        let xml = String::from(&Content::Group(frame.clone()).element());
        assert_eq!(
            Content::frame_from_xml(&xml),
            Some(Content::Group(frame.clone()))
        );
        assert_eq!(Content::frame_from_xml("hello"), None);
        let hold = Content::Hold(frame.clone());
        let e = seal_content(&hold, "a@b.onion", &mut rng);
        assert_eq!(
            open_content(&e, "a@b.onion").expect("open"),
            Some(hold.clone())
        );
        assert_eq!(
            Content::frame_from_xml(&String::from(&hold.element())),
            Some(hold)
        );
        let bad = "<envelope xmlns='urn:xmpp:sce:1'><content><group xmlns='urn:coterie:group:0'>!!</group></content><from jid='a@b'/></envelope>";
        assert!(open_content(bad.as_bytes(), "a@b").is_err());
    }
}
