//! One node under load from many contacts at once (short version; the
//! 50 × 20 msg/s × 60 s figures come from `coterie-bench load`, recorded
//! in docs/reliability.md): nothing lost, nothing stored twice, nothing
//! undecryptable, memory bounded, nothing plain on disk.

use coterie_tests::{NodeProc, assert_nothing_plain, load};

#[test]
fn many_contacts_sending_at_once_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = load::run(tmp.path(), 10, 20, 3);
    eprintln!("{f}");
    assert_eq!(f.sent, 10 * 20 * 3);
    assert_eq!(f.lost, 0, "{f}");
    assert_eq!(f.duplicated, 0, "{f}");
    assert_eq!(f.undecryptable, 0, "{f}");
    assert_eq!(f.unique, f.sent, "{f}");
    // Bounded: 600 messages do not cost the hub more than a few MiB.
    assert!(f.rss_kib.1 < f.rss_kib.0 + 64 * 1024, "{f}");
    let hub = NodeProc::detached("load-hub", tmp.path().join("load-hub"));
    assert_nothing_plain(tmp.path(), &[&hub], &[load::MARK]);
}
