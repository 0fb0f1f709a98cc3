//! A hostile stranger on the LAN: multicasts garbage mDNS packets and
//! announces many well-formed but meaningless Coterie records (or, with
//! `presence`, XEP-0174 `_presence._tcp` records). Run it inside a test
//! namespace only (`ip netns exec NS lan-flood IP GARBAGE RECORDS [SECS]
//! [presence]`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use mdns_sd::{ServiceDaemon, ServiceInfo};
use rand::{Rng, RngCore};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iface: Ipv4Addr = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .expect("usage: lan-flood IP GARBAGE RECORDS");
    let garbage: usize = args.get(2).and_then(|s| s.parse().ok()).expect("GARBAGE");
    let records: usize = args.get(3).and_then(|s| s.parse().ok()).expect("RECORDS");
    let mut rng = rand::thread_rng();

    // Garbage: random bytes, truncated headers, and DNS headers claiming
    // huge counts, straight to the mDNS group.
    let s2 =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    s2.bind(&SocketAddr::from((iface, 0)).into()).expect("bind");
    s2.set_multicast_if_v4(&iface).expect("multicast interface");
    let sock: UdpSocket = s2.into();
    let group = SocketAddr::from((Ipv4Addr::new(224, 0, 0, 251), 5353));
    for i in 0..garbage {
        let len = rng.gen_range(0..1400);
        let mut p = vec![0u8; len];
        rng.fill_bytes(&mut p);
        if i % 3 == 0 && p.len() >= 12 {
            // A response header with 65535 answers.
            p[2] = 0x84;
            p[3] = 0;
            p[6] = 0xff;
            p[7] = 0xff;
        }
        let _ = sock.send_to(&p, group);
    }

    let daemon = ServiceDaemon::new().expect("mdns");
    if args.get(5).map(String::as_str) == Some("presence") {
        // Classic-client records under random names, all at our address.
        for i in 0..records {
            let mut props = HashMap::new();
            props.insert("txtvers".to_string(), "1".to_string());
            props.insert("port.p2pj".to_string(), "5298".to_string());
            props.insert("1st".to_string(), format!("flood{i}"));
            let info = ServiceInfo::new(
                "_presence._tcp.local.",
                &format!("flood{i}x{}@fh{i}", rng.next_u32()),
                &format!("fh{i}.local."),
                iface.to_string().as_str(),
                5298,
                props,
            )
            .expect("info");
            let _ = daemon.register(info);
        }
    }
    // Well-formed Coterie records nobody can read.
    for i in 0..records {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let mut slots = vec![0u8; 12 * 64];
        rng.fill_bytes(&mut slots);
        let b64 = data_encoding::BASE64_NOPAD;
        let mut props = HashMap::new();
        props.insert("v".to_string(), "1".to_string());
        props.insert("n".to_string(), b64.encode(&nonce));
        for (j, c) in slots.chunks(180).enumerate() {
            props.insert(format!("s{j}"), b64.encode(c));
        }
        let info = ServiceInfo::new(
            discovery::lan::record::SERVICE_TYPE,
            &format!("flood{i}x{}", rng.next_u32()),
            &format!("flood{i}.local."),
            iface.to_string().as_str(),
            rng.gen_range(1024..65535),
            props,
        )
        .expect("info");
        let _ = daemon.register(info);
    }
    // Keep answering for a while.
    std::thread::sleep(std::time::Duration::from_secs(
        args.get(4).and_then(|s| s.parse().ok()).unwrap_or(15),
    ));
    let _ = daemon.shutdown();
}
