use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use transport::identity::{PeerId, SecretKey};

use super::wire::{self, Frame, Op, Post, Signed, WireError};
use super::*;

fn key(i: u8) -> SecretKey {
    SecretKey::from_seed(&[i + 1; 32])
}

/// A creator with `n - 1` members added, every member's group loaded from
/// the creator's ops (as a welcome would).
fn group_of(n: u8) -> Vec<Group> {
    let mut g0 = Group::create(key(0), "meeting", 1).expect("create");
    for i in 1..n {
        g0.add(key(i).peer_id(), false, 2).expect("add");
    }
    let ops = g0.ops();
    let mut v = vec![g0];
    for i in 1..n {
        v.push(Group::load(key(i), ops.clone(), Vec::new()).expect("join"));
    }
    v
}

fn posts_of(step: &Step) -> Vec<(PeerId, u64, Vec<u8>)> {
    step.events
        .iter()
        .filter_map(|e| match e {
            Event::Post {
                author, seq, body, ..
            } => Some((*author, *seq, body.clone())),
            _ => None,
        })
        .collect()
}

fn alerts_of(step: &Step) -> Vec<Alert> {
    step.events
        .iter()
        .filter_map(|e| match e {
            Event::Alert(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn frame_with(id: Hash, posts: Vec<Signed>) -> Frame {
    Frame {
        group: id.to_vec(),
        ops: Vec::new(),
        posts,
        summary: None,
        answered: false,
        to_all: false,
    }
}

#[test]
fn a_post_reaches_a_connected_member_once_and_a_replay_changes_nothing() {
    let mut g = group_of(2);
    let id = *g[0].id();
    let (a, b) = (key(0).peer_id(), key(1).peer_id());
    g[0].connected(b, 0);
    g[1].connected(a, 0);
    let (signed, step) = g[0].post(b"hello", 10).expect("post");
    assert_eq!(step.out.len(), 1);
    assert_eq!(step.out[0].to, b);
    let got = g[1].handle(a, step.out[0].frame.clone(), 11);
    assert_eq!(posts_of(&got), vec![(a, 1, b"hello".to_vec())]);
    let again = g[1].handle(a, frame_with(id, vec![signed]), 12);
    assert!(
        posts_of(&again).is_empty(),
        "a replayed post is not shown twice"
    );
    assert!(alerts_of(&again).is_empty());
    assert_eq!(g[1].heads().get(&a), Some(&1));
}

/// Everyone connects to everyone (at time 0: the summaries that go out
/// then rate-limit the next ones for a second).
fn connect_all(g: &mut [Group]) {
    let peers: Vec<PeerId> = (0..g.len()).map(|i| key(i as u8).peer_id()).collect();
    for (i, gi) in g.iter_mut().enumerate() {
        for (j, p) in peers.iter().enumerate() {
            if i != j {
                gi.connected(*p, 0);
            }
        }
    }
}

#[test]
fn a_post_the_author_sent_to_everyone_sets_off_summaries_only_at_the_next_tick() {
    let mut g = group_of(6);
    connect_all(&mut g);
    let a = key(2).peer_id();
    let (_, step) = g[2].post(b"to the whole room", 5000).expect("post");
    assert_eq!(step.out.len(), 5);
    assert!(step.out.iter().all(|o| o.frame.to_all));
    for o in step.out {
        let i = (0..6u8)
            .position(|i| key(i).peer_id() == o.to)
            .expect("member");
        let got = g[i].handle(a, o.frame, 5001);
        assert_eq!(posts_of(&got).len(), 1);
        assert!(got.out.is_empty(), "member {i} told the others at once");
    }
    // They are told at the next tick (a member the author's copy missed
    // still gets it from the others within a second).
    let tick = g[0].tick(6001);
    assert!(
        tick.out.iter().any(|o| o.frame.summary.is_some()),
        "nobody told at the tick"
    );
    // The flag counts only from the author: relayed with it, the post
    // still sets off summaries to the others.
    let mut g = group_of(4);
    connect_all(&mut g);
    let (signed, _) = g[1].post(b"relayed", 5000).expect("post");
    let mut f = frame_with(*g[0].id(), vec![signed]);
    f.to_all = true;
    let got = g[3].handle(key(0).peer_id(), f, 5001);
    assert_eq!(posts_of(&got).len(), 1);
    assert!(!got.out.is_empty(), "a relay's flag was trusted");
}

#[test]
fn an_author_who_cannot_reach_everyone_lets_the_others_pass_it_on() {
    let mut g = group_of(4);
    connect_all(&mut g);
    let (a, d) = (key(0).peer_id(), key(3).peer_id());
    g[0].disconnected(d);
    let (_, step) = g[0].post(b"d is away from me", 5000).expect("post");
    assert_eq!(step.out.len(), 2);
    assert!(step.out.iter().all(|o| !o.frame.to_all));
    let got = g[1].handle(a, step.out[0].frame.clone(), 5001);
    assert!(
        got.out.iter().any(|o| o.to == d),
        "the member connected to d tells d"
    );
}

#[test]
fn posts_that_arrive_out_of_order_are_shown_in_the_authors_order() {
    let mut g = group_of(2);
    let id = *g[0].id();
    let a = key(0).peer_id();
    let s: Vec<Signed> = (1..=3)
        .map(|i| g[0].post(format!("m{i}").as_bytes(), i).expect("post").0)
        .collect();
    let first = g[1].handle(a, frame_with(id, vec![s[2].clone(), s[1].clone()]), 5);
    assert!(posts_of(&first).is_empty(), "nothing before m1");
    let rest = g[1].handle(a, frame_with(id, vec![s[0].clone()]), 6);
    let seqs: Vec<u64> = posts_of(&rest).iter().map(|p| p.1).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[test]
fn an_altered_post_is_refused_and_its_relay_reported() {
    let mut g = group_of(3);
    let id = *g[0].id();
    let (a, c) = (key(0).peer_id(), key(2).peer_id());
    let (mut s, _) = g[0].post(b"meet at six", 1).expect("post");
    // The relay changes one byte of the text.
    let at = s.body.len() - 12;
    s.body[at] ^= 1;
    let got = g[1].handle(c, frame_with(id, vec![s]), 2);
    assert!(posts_of(&got).is_empty());
    assert!(
        matches!(alerts_of(&got).as_slice(), [Alert::Forged { peer, .. }] if *peer == c),
        "{:?}",
        got.events
    );
    // A post "by a" signed by someone else is refused the same way.
    let forged = Post::seal(&key(2), g[0].id(), 2, &[0; 32], &g[0].head(), &[], b"x", 3);
    let mut body =
        <wire::PostBody as prost::Message>::decode(forged.body.as_slice()).expect("decode");
    body.author = a.as_bytes().to_vec();
    let swapped = Signed {
        body: prost::Message::encode_to_vec(&body),
        sig: forged.sig,
    };
    let got = g[1].handle(c, frame_with(id, vec![swapped]), 4);
    assert!(matches!(
        alerts_of(&got).as_slice(),
        [Alert::Forged {
            why: WireError::Signature,
            ..
        }]
    ));
    assert!(g[1].heads().get(&a).is_none());
}

#[test]
fn an_author_who_signs_two_posts_with_one_number_is_detected() {
    let mut g = group_of(2);
    let id = *g[0].id();
    let a = key(0).peer_id();
    let head = g[0].head();
    let one = Post::seal(&key(0), g[0].id(), 1, &[0; 32], &head, &[], b"yes", 1);
    let other = Post::seal(&key(0), g[0].id(), 1, &[0; 32], &head, &[], b"no", 1);
    let first = g[1].handle(a, frame_with(id, vec![one]), 2);
    assert_eq!(posts_of(&first).len(), 1);
    let second = g[1].handle(a, frame_with(id, vec![other]), 3);
    assert!(posts_of(&second).is_empty());
    assert!(matches!(
        alerts_of(&second).as_slice(),
        [Alert::Equivocation { author }] if *author == a
    ));
}

#[test]
fn a_post_over_the_size_limit_and_a_frame_over_the_frame_limit_are_refused() {
    let mut g = group_of(2);
    let id = *g[0].id();
    assert_eq!(
        g[0].post(&vec![b'x'; wire::MAX_BODY + 1], 1).err(),
        Some(ActionError::Body)
    );
    assert_eq!(g[0].post(b"", 1).err(), Some(ActionError::Body));
    let a = key(0).peer_id();
    let big = Post::seal(
        &key(0),
        g[0].id(),
        1,
        &[0; 32],
        &g[0].head(),
        &[],
        &vec![b'x'; wire::MAX_BODY + 1],
        1,
    );
    let got = g[1].handle(a, frame_with(id, vec![big]), 2);
    assert!(matches!(
        alerts_of(&got).as_slice(),
        [Alert::Forged {
            why: WireError::Field(_),
            ..
        }]
    ));
    assert!(Frame::decode(&vec![0u8; wire::MAX_FRAME + 1]).is_err());
    assert_eq!(Frame::decode(&[0xff, 0xff, 0xff]), Err(WireError::Decode));
}

#[test]
fn a_member_who_floods_is_refused_beyond_a_burst_and_others_are_unaffected() {
    let mut g = group_of(3);
    let id = *g[0].id();
    let (a, c) = (key(0).peer_id(), key(2).peer_id());
    // 2,000 valid posts, signed by member a, arrive at once.
    let flood: Vec<Signed> = (1..=2000)
        .map(|i| {
            g[0].post(format!("spam {i}").as_bytes(), 1)
                .expect("post")
                .0
        })
        .collect();
    let mut shown = 0;
    let mut floods = 0;
    for chunk in flood.chunks(100) {
        let step = g[1].handle(a, frame_with(id, chunk.to_vec()), 1_000);
        shown += posts_of(&step).len();
        floods += alerts_of(&step)
            .iter()
            .filter(|x| matches!(x, Alert::Flood { author } if *author == a))
            .count();
    }
    assert_eq!(shown, super::FLOOD_BURST as usize, "a burst, then refused");
    assert_eq!(floods, 1, "reported once");
    // Another member is unaffected.
    let (other, _) = g[2].post(b"meanwhile, a real message", 1).expect("post");
    let step = g[1].handle(c, frame_with(id, vec![other]), 1_000);
    assert_eq!(posts_of(&step).len(), 1);
    // A minute later, more of the flood gets in, slowly.
    let step = g[1].handle(a, frame_with(id, flood[500..1000].to_vec()), 61_000);
    assert_eq!(posts_of(&step).len(), 300);
}

/// Delivers frames until none is left; returns how many were delivered.
fn run(g: &mut [Group], first: Vec<(usize, Out)>, now: u64) -> usize {
    let n = g.len();
    let idx = |p: &PeerId| (0..n).find(|i| key(*i as u8).peer_id() == *p);
    let mut q: VecDeque<(usize, Out)> = first.into();
    let mut frames = 0;
    while let Some((from, o)) = q.pop_front() {
        let Some(to) = idx(&o.to) else { continue };
        frames += 1;
        let step = g[to].handle(key(from as u8).peer_id(), o.frame, now);
        q.extend(step.out.into_iter().map(|o| (to, o)));
    }
    frames
}

#[test]
fn a_member_who_relays_an_author_to_someone_pushes_the_next_posts_at_once() {
    // a – b – c: c is not connected to a.
    let mut g = group_of(3);
    let (a, b, c) = (key(0).peer_id(), key(1).peer_id(), key(2).peer_id());
    g[0].connected(b, 0);
    g[1].connected(a, 0);
    g[1].connected(c, 0);
    g[2].connected(b, 0);
    let (_, s) = g[0].post(b"first", 5_000).expect("post");
    let first: Vec<(usize, Out)> = s.out.into_iter().map(|o| (0, o)).collect();
    let frames = run(&mut g, first, 5_000);
    assert_eq!(
        g[2].heads().get(&a),
        Some(&1),
        "c got the first post through b"
    );
    assert!(
        frames >= 4,
        "the first post took a summary exchange ({frames} frames)"
    );
    // The second post: b pushes it to c at once, no summaries.
    let (_, s) = g[0].post(b"second", 10_000).expect("post");
    let first: Vec<(usize, Out)> = s.out.into_iter().map(|o| (0, o)).collect();
    assert_eq!(run(&mut g, first, 10_000), 2, "a → b → c");
    assert_eq!(g[2].heads().get(&a), Some(&2));
    // A summary held back by the rate limit goes out at the next tick.
    let (_, s) = g[0].post(b"third", 10_100).expect("post");
    g[1].disconnected(c);
    g[1].connected(c, 10_100);
    let first: Vec<(usize, Out)> = s.out.into_iter().map(|o| (0, o)).collect();
    run(&mut g, first, 10_200);
    assert_eq!(g[2].heads().get(&a), Some(&2), "held back");
    let later = g[1].tick(11_200);
    let first: Vec<(usize, Out)> = later.out.into_iter().map(|o| (1, o)).collect();
    run(&mut g, first, 11_200);
    assert_eq!(g[2].heads().get(&a), Some(&3), "sent at the tick");
}

#[test]
fn membership_changes_that_arrive_out_of_order_or_twice_converge() {
    let mut g0 = Group::create(key(0), "collective", 1).expect("create");
    let mut sent = Vec::new();
    for i in 1..5 {
        let step = g0.add(key(i).peer_id(), i == 1, 2).expect("add");
        assert!(step.events.contains(&Event::Membership));
    }
    g0.rename("the collective", 3).expect("rename");
    g0.remove(key(3).peer_id(), 4).expect("remove");
    sent.extend(g0.ops());
    // Member 1 has only the genesis and the op that added it, then gets
    // the rest reversed and duplicated.
    let welcome: Vec<Signed> = sent[..2].to_vec();
    let mut g1 = Group::load(key(1), welcome, Vec::new()).expect("join");
    let mut rest: Vec<Signed> = sent[2..].to_vec();
    rest.reverse();
    rest.extend(sent.clone());
    let f = Frame {
        group: g1.id().to_vec(),
        ops: rest,
        summary: None,
        posts: Vec::new(),
        answered: false,
        to_all: false,
    };
    let step = g1.handle(key(0).peer_id(), f, 5);
    assert!(alerts_of(&step).is_empty(), "{:?}", step.events);
    assert_eq!(g1.head(), g0.head());
    assert_eq!(g1.state(), g0.state());
    assert_eq!(g1.state().name, "the collective");
    assert_eq!(g1.state().members.len(), 4);
    assert!(g1.state().gone.contains_key(&key(3).peer_id()));
}

#[test]
fn only_admins_change_membership_and_a_forged_change_is_reported() {
    let mut g = group_of(3);
    let id = *g[0].id();
    assert_eq!(
        g[1].add(key(9).peer_id(), false, 1).err(),
        Some(ActionError::Refused(Refused::NotAdmin))
    );
    assert_eq!(
        g[1].rename("mine now", 1).err(),
        Some(ActionError::Refused(Refused::NotAdmin))
    );
    // A member signs an add anyway and sends it.
    let op = Op::seal(
        &key(1),
        g[0].id(),
        g[0].state().epoch + 1,
        &g[0].head(),
        &Change::Add {
            member: key(9).peer_id(),
            admin: true,
            base: Vec::new(),
        },
        1,
    );
    let before = g[0].state().clone();
    let f = Frame {
        group: id.to_vec(),
        ops: vec![op],
        ..frame_with(id, Vec::new())
    };
    let step = g[0].handle(key(1).peer_id(), f, 2);
    assert!(matches!(
        alerts_of(&step).as_slice(),
        [Alert::BadChange {
            why: Refused::NotAdmin,
            ..
        }]
    ));
    assert_eq!(g[0].state(), &before);
    // Names are checked.
    assert_eq!(g[0].rename("", 3).err(), Some(ActionError::Name));
    assert_eq!(
        g[0].rename(&"x".repeat(65), 3).err(),
        Some(ActionError::Name)
    );
    assert_eq!(g[0].rename("a\u{7}b", 3).err(), Some(ActionError::Name));
}

#[test]
fn a_removed_member_is_sent_nothing_after_the_removal_and_its_later_posts_do_not_count() {
    let mut g = group_of(3);
    let id = *g[0].id();
    let (a, b, c) = (key(0).peer_id(), key(1).peer_id(), key(2).peer_id());
    for (i, gi) in g.iter_mut().enumerate() {
        for p in [a, b, c] {
            if p != key(i as u8).peer_id() {
                gi.connected(p, 0);
            }
        }
    }
    // c posts once, everyone has it; then the admin removes c.
    let (_, step) = g[2].post(b"before", 1).expect("post");
    for o in step.out {
        let i = if o.to == a { 0 } else { 1 };
        g[i].handle(c, o.frame, 2);
    }
    let step = g[0].remove(c, 3).expect("remove");
    let to: BTreeSet<PeerId> = step.out.iter().map(|o| o.to).collect();
    assert_eq!(
        to,
        [b, c].into_iter().collect(),
        "the removed member is told"
    );
    for o in step.out {
        let i = if o.to == b { 1 } else { 2 };
        g[i].handle(a, o.frame, 4);
    }
    assert!(!g[2].is_member());
    assert_eq!(
        g[2].post(b"still here?", 5).err(),
        Some(ActionError::NotMember)
    );
    // b's next post goes to a only.
    let (_, step) = g[1].post(b"after", 6).expect("post");
    assert_eq!(step.out.iter().map(|o| o.to).collect::<Vec<_>>(), vec![a]);
    // A post c signs anyway, naming the old membership, does not count.
    let old_head = *g[0].chain.get(g[0].chain.len() - 2).expect("parent");
    let prev = g[0].posts.get(&(c, 1)).expect("c's post").post.hash;
    let late = Post::seal(&key(2), g[0].id(), 2, &prev, &old_head, &[], b"sneaky", 7);
    let got = g[0].handle(b, frame_with(id, vec![late]), 8);
    assert!(posts_of(&got).is_empty());
    // And a summary from c is not answered.
    let f = Frame {
        summary: Some(wire::Summary {
            mhead: old_head.to_vec(),
            heads: Vec::new(),
        }),
        ..frame_with(id, Vec::new())
    };
    assert!(g[1].handle(c, f, 9).out.is_empty());
}

#[test]
fn concurrent_changes_converge_and_the_loser_is_reissued() {
    // Two admins change the membership at the same time, apart.
    let mut g0 = Group::create(key(0), "two admins", 1).expect("create");
    g0.add(key(1).peer_id(), true, 1).expect("add");
    g0.add(key(2).peer_id(), false, 1).expect("add");
    let mut g1 = Group::load(key(1), g0.ops(), Vec::new()).expect("join");
    g0.add(key(3).peer_id(), false, 2).expect("add");
    g1.rename("renamed", 2).expect("rename");
    let (a, b) = (key(0).peer_id(), key(1).peer_id());
    // They meet.
    let s0 = g0.connected(b, 3);
    let s1 = g1.connected(a, 3);
    let mut q: VecDeque<(usize, Frame)> = VecDeque::new();
    for o in s0.out {
        q.push_back((1, o.frame));
    }
    for o in s1.out {
        q.push_back((0, o.frame));
    }
    let mut n = 0;
    while let Some((to, f)) = q.pop_front() {
        n += 1;
        assert!(n < 100, "no convergence");
        let (step, back) = if to == 0 {
            (g0.handle(b, f, 4), 1)
        } else {
            (g1.handle(a, f, 4), 0)
        };
        assert!(alerts_of(&step).is_empty(), "{:?}", step.events);
        for o in step.out {
            q.push_back((back, o.frame));
        }
    }
    assert_eq!(g0.head(), g1.head());
    assert_eq!(g0.state().name, "renamed");
    assert!(g0.state().members.contains_key(&key(3).peer_id()));
    assert_eq!(g0.state(), g1.state());
}

#[test]
fn a_stored_group_loads_to_the_same_state_without_showing_posts_again() {
    let mut g = group_of(2);
    let id = *g[0].id();
    let a = key(0).peer_id();
    let s: Vec<Signed> = (1..=3)
        .map(|i| g[0].post(b"stored", i).expect("post").0)
        .collect();
    g[1].handle(a, frame_with(id, s.clone()), 4);
    let posts: Vec<Signed> = g[1].posts().map(|(_, s)| s.clone()).collect();
    let again = Group::load(key(1), g[1].ops(), posts).expect("load");
    assert_eq!(again.heads(), g[1].heads());
    assert_eq!(again.state(), g[1].state());
    // A stranger's key cannot load it.
    assert_eq!(
        Group::load(key(7), g[1].ops(), Vec::new()).err(),
        Some(LoadError::NotMember)
    );
}

// ---------------------------------------------------------------------
// An in-memory network of members: links up and down, members offline at
// random (the creator too), partitions that heal, frames lost when a link
// drops. Every member must end with every post exactly once, each author's
// in order.

#[derive(Clone, Copy, PartialEq)]
enum Bad {
    /// Flips a byte in every post it relays for someone else.
    Forger,
    /// Relays nobody's posts by this member (but says it has them).
    Dropper(usize),
}

struct Sim {
    groups: Vec<Group>,
    ids: Vec<PeerId>,
    index: HashMap<PeerId, usize>,
    contacts: BTreeSet<(usize, usize)>,
    online: Vec<bool>,
    side: Vec<u8>,
    up: BTreeSet<(usize, usize)>,
    queues: BTreeMap<(usize, usize), VecDeque<Frame>>,
    shown: Vec<Vec<(PeerId, u64, Vec<u8>)>>,
    alerts: Vec<Vec<Alert>>,
    written: Vec<(PeerId, u64)>,
    bad: BTreeMap<usize, Bad>,
    now: u64,
    rng: StdRng,
}

impl Sim {
    fn new(n: u8, seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let groups = group_of(n);
        let ids: Vec<PeerId> = (0..n).map(|i| key(i).peer_id()).collect();
        let n = n as usize;
        // A sparse contact graph: a ring plus random chords.
        let mut contacts = BTreeSet::new();
        for i in 0..n {
            contacts.insert(pair(i, (i + 1) % n));
            for j in i + 1..n {
                if rng.gen_bool(0.2) {
                    contacts.insert(pair(i, j));
                }
            }
        }
        Sim {
            index: ids.iter().enumerate().map(|(i, p)| (*p, i)).collect(),
            groups,
            ids,
            contacts,
            online: vec![true; n],
            side: vec![0; n],
            up: BTreeSet::new(),
            queues: BTreeMap::new(),
            shown: vec![Vec::new(); n],
            alerts: vec![Vec::new(); n],
            written: Vec::new(),
            bad: BTreeMap::new(),
            now: 10,
            rng,
        }
    }

    fn should_be_up(&self, (i, j): (usize, usize)) -> bool {
        self.online[i] && self.online[j] && self.side[i] == self.side[j]
    }

    /// Brings links up and down after a change, like sessions would.
    fn relink(&mut self) {
        let contacts: Vec<(usize, usize)> = self.contacts.iter().copied().collect();
        for (i, j) in contacts {
            let want = self.should_be_up((i, j));
            let is = self.up.contains(&(i, j));
            if want && !is {
                self.up.insert((i, j));
                let s = self.groups[i].connected(self.ids[j], self.now);
                self.absorb(i, s);
                let s = self.groups[j].connected(self.ids[i], self.now);
                self.absorb(j, s);
            } else if !want && is {
                self.up.remove(&(i, j));
                self.queues.remove(&(i, j));
                self.queues.remove(&(j, i));
                self.groups[i].disconnected(self.ids[j]);
                self.groups[j].disconnected(self.ids[i]);
            }
        }
    }

    fn absorb(&mut self, i: usize, step: Step) {
        for e in step.events {
            match e {
                Event::Post {
                    author, seq, body, ..
                } => self.shown[i].push((author, seq, body)),
                Event::Alert(a) => self.alerts[i].push(a),
                _ => {}
            }
        }
        for o in step.out {
            let Some(&j) = self.index.get(&o.to) else {
                continue;
            };
            if !self.up.contains(&pair(i, j)) {
                continue;
            }
            let mut frame = o.frame;
            match self.bad.get(&i) {
                Some(Bad::Forger) => {
                    for p in frame.posts.iter_mut() {
                        if Post::open(p).is_ok_and(|p| p.author != self.ids[i]) {
                            let at = p.body.len() - 3;
                            p.body[at] ^= 0x20;
                        }
                    }
                }
                Some(Bad::Dropper(victim)) => {
                    let victim = self.ids[*victim];
                    frame
                        .posts
                        .retain(|p| Post::open(p).map(|p| p.author != victim).unwrap_or(true));
                }
                None => {}
            }
            // Through the wire format, as a real hop would.
            let frame = Frame::decode(&frame.encode()).unwrap_or_else(|e| {
                panic!(
                    "own frame from {i} does not decode ({e}): {} bytes, {} ops, {} posts",
                    frame.size(),
                    frame.ops.len(),
                    frame.posts.len()
                )
            });
            self.queues.entry((i, j)).or_default().push_back(frame);
        }
    }

    fn deliver_one(&mut self) -> bool {
        let busy: Vec<(usize, usize)> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if busy.is_empty() {
            return false;
        }
        let (i, j) = busy[self.rng.gen_range(0..busy.len())];
        let Some(frame) = self.queues.get_mut(&(i, j)).and_then(|q| q.pop_front()) else {
            return false;
        };
        let s = self.groups[j].handle(self.ids[i], frame, self.now);
        self.absorb(j, s);
        true
    }

    fn post(&mut self, i: usize) {
        let body = format!("post {} by {i}", self.written.len());
        let (signed, s) = self.groups[i]
            .post(body.as_bytes(), self.now)
            .expect("post");
        let p = Post::open(&signed).expect("own post");
        self.written.push((p.author, p.seq));
        self.absorb(i, s);
    }

    fn tick_all(&mut self) {
        for i in 0..self.groups.len() {
            if self.online[i] {
                let s = self.groups[i].tick(self.now);
                self.absorb(i, s);
            }
        }
    }

    /// Random churn for `steps` steps; node `creator_off` from a point on.
    fn churn(&mut self, steps: usize, creator_offline_from: usize) {
        let n = self.groups.len();
        self.relink();
        for step in 0..steps {
            self.now += 100;
            if step == creator_offline_from {
                self.online[0] = false;
                self.relink();
            }
            let r: f64 = self.rng.r#gen();
            if r < 0.02 {
                let i = self.rng.gen_range(1..n);
                self.online[i] = !self.online[i];
                self.relink();
            } else if r < 0.025 {
                // A partition starts, or heals.
                if self.side.iter().all(|s| *s == 0) {
                    for s in self.side.iter_mut() {
                        *s = u8::from(self.rng.gen_bool(0.5));
                    }
                } else {
                    self.side = vec![0; n];
                }
                self.relink();
            } else if r < 0.125 {
                let i = self.rng.gen_range(0..n);
                if self.online[i] {
                    self.post(i);
                }
            } else {
                self.deliver_one();
            }
            if step % 50 == 0 {
                self.tick_all();
            }
        }
    }

    /// Everyone online, no partition, until nothing moves.
    fn settle(&mut self) {
        self.online = vec![true; self.groups.len()];
        self.side = vec![0; self.groups.len()];
        self.relink();
        for _ in 0..5 {
            while self.deliver_one() {}
            self.now += 61_000;
            self.tick_all();
        }
        while self.deliver_one() {}
    }

    fn check_everyone_has_everything(&self, honest: impl Fn(usize) -> bool) {
        for (i, shown) in self.shown.iter().enumerate() {
            if !honest(i) {
                continue;
            }
            let me = self.ids[i];
            let mut seen = BTreeSet::new();
            let mut last: BTreeMap<PeerId, u64> = BTreeMap::new();
            for (a, s, _) in shown {
                assert!(seen.insert((*a, *s)), "member {i} shown a post twice");
                let l = last.entry(*a).or_insert(0);
                assert_eq!(*s, *l + 1, "member {i}: an author's posts out of order");
                *l = *s;
            }
            let want: BTreeSet<(PeerId, u64)> = self
                .written
                .iter()
                .filter(|(a, _)| *a != me)
                .copied()
                .collect();
            let missing = want.difference(&seen).count();
            assert_eq!(
                missing,
                0,
                "member {i} lacks {missing} of {} posts",
                want.len()
            );
        }
    }
}

fn pair(i: usize, j: usize) -> (usize, usize) {
    (i.min(j), i.max(j))
}

#[test]
fn twenty_members_with_churn_partitions_and_the_creator_offline_all_get_every_post_once() {
    for seed in 1..=4 {
        let mut sim = Sim::new(20, seed);
        sim.churn(6000, 1500);
        assert!(sim.written.len() > 200, "only {} posts", sim.written.len());
        // Posts written while the creator was away reach everyone.
        assert!(!sim.online[0]);
        sim.settle();
        sim.check_everyone_has_everything(|_| true);
        for (i, a) in sim.alerts.iter().enumerate() {
            assert!(a.is_empty(), "seed {seed}: member {i} raised {a:?}");
        }
        // The same membership everywhere.
        let head = sim.groups[0].head();
        assert!(sim.groups.iter().all(|g| g.head() == head));
    }
}

#[test]
fn a_forging_member_and_a_dropping_member_are_detected_and_everyone_still_gets_everything() {
    let mut sim = Sim::new(20, 99);
    sim.bad.insert(5, Bad::Forger);
    sim.bad.insert(7, Bad::Dropper(3));
    sim.churn(6000, usize::MAX);
    sim.settle();
    let honest = |i: usize| i != 5 && i != 7;
    sim.check_everyone_has_everything(honest);
    let (forger, dropper, victim) = (sim.ids[5], sim.ids[7], sim.ids[3]);
    let mut forged = 0;
    let mut withheld = 0;
    for (i, alerts) in sim.alerts.iter().enumerate() {
        if !honest(i) {
            continue;
        }
        for a in alerts {
            match a {
                Alert::Forged { peer, .. } => {
                    assert_eq!(*peer, forger, "only the forger is blamed");
                    forged += 1;
                }
                // What the forger altered is also missing after its answer.
                Alert::Withheld { peer, .. } if *peer == forger => {}
                Alert::Withheld { peer, author, .. } => {
                    assert_eq!(
                        (*peer, *author),
                        (dropper, victim),
                        "only the dropper is blamed"
                    );
                    withheld += 1;
                }
                other => panic!("member {i}: unexpected {other:?}"),
            }
        }
    }
    assert!(forged > 0, "the forger went unnoticed");
    assert!(withheld > 0, "the dropper went unnoticed");
}
