//! Device lists and bundles as PEP items (XEP-0163 notifications with the
//! node names and item formats of XEP-0384), pushed over the direct stream
//! when it opens and whenever our bundle changes. The same elements serve
//! the bridge's PEP later.

use minidom::Element;
use rxml::NcName;

use super::xml::{Bundle, devices_element, parse_devices};
use super::{Identity, OmemoError, OwnDevice, Result, Version};

/// XEP-0060 event namespace.
pub const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// At most this many items are read from one event.
pub const MAX_ITEMS: usize = 16;

fn nc(s: &'static str) -> NcName {
    NcName::try_from(s).unwrap_or_else(|_| unreachable!("constant attribute name"))
}

fn event(node: String, item_id: String, payload: Element) -> Element {
    Element::builder("event", NS_PUBSUB_EVENT)
        .append(
            Element::builder("items", NS_PUBSUB_EVENT)
                .attr(nc("node"), node)
                .append(
                    Element::builder("item", NS_PUBSUB_EVENT)
                        .attr(nc("id"), item_id)
                        .append(payload)
                        .build(),
                )
                .build(),
        )
        .build()
}

/// Our device list and bundle in both versions, as four notifications.
pub fn announcements(own: &OwnDevice, id: &Identity) -> Vec<Element> {
    let mut out = Vec::with_capacity(4);
    for v in Version::ALL {
        out.push(event(
            v.devices_node().to_string(),
            "current".into(),
            devices_element(v, &[own.device_id]),
        ));
        let item_id = match v {
            Version::V2 => own.device_id.to_string(),
            Version::V03 => "current".into(),
        };
        out.push(event(
            v.bundle_node(own.device_id),
            item_id,
            own.bundle(id, v).to_element(),
        ));
    }
    out
}

/// What one notification carried.
#[derive(Debug, Clone)]
pub enum PepItem {
    /// A device list.
    Devices(Version, Vec<u32>),
    /// A device's bundle (checked), and its XML as received.
    Bundle(u32, Bundle, String),
}

/// XEP-0060 namespace (requests and results).
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";

/// Reads an `<event/>`: device lists and bundles of either version.
pub fn parse_event(el: &Element) -> Result<Vec<PepItem>> {
    if !el.is("event", NS_PUBSUB_EVENT) {
        return Err(OmemoError::Malformed("PEP event"));
    }
    parse_items(el, NS_PUBSUB_EVENT)
}

/// Reads the `<pubsub/>` of an items result (what a server returns for
/// [`fetch_items`]).
pub fn parse_result(el: &Element) -> Result<Vec<PepItem>> {
    if !el.is("pubsub", NS_PUBSUB) {
        return Err(OmemoError::Malformed("PEP result"));
    }
    parse_items(el, NS_PUBSUB)
}

/// The `<pubsub/>` payload asking for `node`'s items (one, if `item`).
pub fn fetch_items(node: &str, item: Option<&str>) -> Element {
    let mut items = Element::builder("items", NS_PUBSUB).attr(nc("node"), node);
    if let Some(id) = item {
        items = items.append(
            Element::builder("item", NS_PUBSUB)
                .attr(nc("id"), id)
                .build(),
        );
    } else {
        items = items.attr(nc("max_items"), "1");
    }
    Element::builder("pubsub", NS_PUBSUB)
        .append(items.build())
        .build()
}

/// The `<pubsub/>` payloads publishing our device list and bundle in both
/// versions to our own server's PEP, readable by anyone (XEP-0384 asks for
/// the `open` access model: friends without a presence subscription must
/// be able to fetch them).
pub fn publications(own: &OwnDevice, id: &Identity) -> Vec<Element> {
    let mut out = Vec::with_capacity(4);
    for v in Version::ALL {
        out.push(publish(
            v.devices_node(),
            "current",
            devices_element(v, &[own.device_id]),
            // A device list lists every device: keep one item.
            "1",
        ));
        let item_id = match v {
            Version::V2 => own.device_id.to_string(),
            Version::V03 => "current".into(),
        };
        out.push(publish(
            &v.bundle_node(own.device_id),
            &item_id,
            own.bundle(id, v).to_element(),
            "max",
        ));
    }
    out
}

fn publish(node: &str, item_id: &str, payload: Element, max_items: &str) -> Element {
    let field = |var: &str, value: &str, hidden: bool| {
        let mut f = Element::builder("field", "jabber:x:data").attr(nc("var"), var);
        if hidden {
            f = f.attr(nc("type"), "hidden");
        }
        f.append(
            Element::builder("value", "jabber:x:data")
                .append(value)
                .build(),
        )
        .build()
    };
    let options = Element::builder("x", "jabber:x:data")
        .attr(nc("type"), "submit")
        .append(field(
            "FORM_TYPE",
            "http://jabber.org/protocol/pubsub#publish-options",
            true,
        ))
        .append(field("pubsub#access_model", "open", false))
        .append(field("pubsub#persist_items", "true", false))
        .append(field("pubsub#max_items", max_items, false))
        .build();
    Element::builder("pubsub", NS_PUBSUB)
        .append(
            Element::builder("publish", NS_PUBSUB)
                .attr(nc("node"), node)
                .append(
                    Element::builder("item", NS_PUBSUB)
                        .attr(nc("id"), item_id)
                        .append(payload)
                        .build(),
                )
                .build(),
        )
        .append(
            Element::builder("publish-options", NS_PUBSUB)
                .append(options)
                .build(),
        )
        .build()
}

fn parse_items(el: &Element, ns: &str) -> Result<Vec<PepItem>> {
    let mut out = Vec::new();
    for items in el.children().filter(|c| c.is("items", ns)) {
        let node = items.attr("node").unwrap_or_default();
        for item in items.children().filter(|c| c.is("item", ns)) {
            if out.len() == MAX_ITEMS {
                return Ok(out);
            }
            let Some(payload) = item.children().next() else {
                continue;
            };
            if node == Version::V2.devices_node() || node == Version::V03.devices_node() {
                let (v, ids) = parse_devices(payload)?;
                if v.devices_node() != node {
                    return Err(OmemoError::Malformed("device list in the wrong node"));
                }
                out.push(PepItem::Devices(v, ids));
            } else if node == Version::V2.bundle_node(0) {
                let dev = item
                    .attr("id")
                    .and_then(|i| i.parse::<u32>().ok())
                    .ok_or(OmemoError::Malformed("bundle item id"))?;
                let b = Bundle::parse(payload)?;
                if b.version != Version::V2 {
                    return Err(OmemoError::Malformed("bundle in the wrong node"));
                }
                out.push(PepItem::Bundle(dev, b, String::from(payload)));
            } else if let Some(dev) = node
                .strip_prefix("eu.siacs.conversations.axolotl.bundles:")
                .and_then(|d| d.parse::<u32>().ok())
            {
                let b = Bundle::parse(payload)?;
                if b.version != Version::V03 {
                    return Err(OmemoError::Malformed("bundle in the wrong node"));
                }
                out.push(PepItem::Bundle(dev, b, String::from(payload)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse_back() {
        let id = Identity::from_seed(&[4; 32]);
        let own = OwnDevice::new(0, &mut rand::rngs::OsRng);
        let mut got = Vec::new();
        for el in announcements(&own, &id) {
            let text = String::from(&el);
            got.extend(parse_event(&text.parse::<Element>().expect("xml")).expect("parse"));
        }
        assert_eq!(got.len(), 4);
        let bundles = got
            .iter()
            .filter(|i| matches!(i, PepItem::Bundle(d, b, _) if *d == own.device_id && b.ik == id.ed_public()))
            .count();
        assert_eq!(bundles, 2);
    }
}
