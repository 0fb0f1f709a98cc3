//! The profile's settings: what the user chose in the app, kept (encrypted)
//! in the profile record.
//!
//! `padding` and `jitter` apply to every stream the node runs, whoever
//! starts it (the app or `coterie run`); `lan`, `tor`, `tor_config` and
//! `compat` are what the app starts the node with (the command line has its
//! own flags for these).

use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use crate::stream::padding::Padding;

/// Small random delays before our messages leave, so that the moment the
/// user presses Enter is not the moment the packets appear. Messages keep
/// their order: the delay holds the whole queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Send at once.
    #[default]
    Off,
    /// Up to 300 ms.
    Light,
    /// Up to 1.5 s.
    Strong,
}

impl Jitter {
    /// Every level, lightest first.
    pub const ALL: [Jitter; 3] = [Jitter::Off, Jitter::Light, Jitter::Strong];

    /// The longest delay.
    pub fn max_delay(self) -> Duration {
        match self {
            Jitter::Off => Duration::ZERO,
            Jitter::Light => Duration::from_millis(300),
            Jitter::Strong => Duration::from_millis(1500),
        }
    }

    /// A delay drawn uniformly from `[0, max_delay]`; `None` when off.
    pub fn draw(self, rng: &mut impl rand::Rng) -> Option<Duration> {
        let max = self.max_delay().as_millis() as u64;
        (max > 0).then(|| Duration::from_millis(rng.gen_range(0..=max)))
    }

    /// The name used in settings.
    pub fn name(self) -> &'static str {
        match self {
            Jitter::Off => "off",
            Jitter::Light => "light",
            Jitter::Strong => "strong",
        }
    }
}

/// What the user chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where the app's node listens (TCP and QUIC), `IP:PORT`; empty:
    /// 127.0.0.1:7474. Contacts on the LAN need a LAN address here.
    pub listen: Vec<String>,
    /// Announce and find contacts on the local network (encrypted mDNS).
    pub lan: bool,
    /// Run the onion service and reach contacts over Tor.
    pub tor: bool,
    /// An arti TOML file (bridges, a private network); `None`: arti's defaults.
    pub tor_config: Option<String>,
    /// **Dangerous**: XEP-0174 compatibility (name announced in the clear,
    /// cleartext chats with classic clients).
    pub compat: bool,
    /// How stream writes are padded.
    pub padding: Padding,
    /// Random delay before messages leave.
    pub jitter: Jitter,
    /// Offline delivery through contacts who hold (`docs/protocol.md` §7.5).
    pub hold: HoldSettings,
}

/// Offline delivery held by others: both halves are off until the user
/// turns them on (`coterie holding`); `coterie serve` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HoldSettings {
    /// Leave messages for an offline contact with mutual contacts who offer
    /// to hold (they see who the message is for and its size, never its text).
    pub use_holders: bool,
    /// Hold sealed messages between our contacts for them.
    pub offer: bool,
    /// How long what we leave is held, in hours.
    pub ttl_hours: u32,
}

impl Default for HoldSettings {
    fn default() -> Self {
        HoldSettings {
            use_holders: false,
            offer: false,
            ttl_hours: (crate::hold::DEFAULT_TTL_SECS / 3600) as u32,
        }
    }
}

impl HoldSettings {
    /// The expiry we ask holders for, in seconds.
    pub fn ttl_secs(&self) -> u64 {
        (u64::from(self.ttl_hours) * 3600).clamp(3600, crate::hold::MAX_TTL_SECS)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: Vec::new(),
            lan: false,
            tor: true,
            tor_config: None,
            compat: false,
            padding: Padding::Standard,
            jitter: Jitter::Off,
            hold: HoldSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bound() {
        let mut rng = rand::thread_rng();
        assert_eq!(Jitter::Off.draw(&mut rng), None);
        for _ in 0..200 {
            let d = Jitter::Light.draw(&mut rng).unwrap_or(Duration::MAX);
            assert!(d <= Duration::from_millis(300));
        }
    }

    #[test]
    fn old_records_get_the_defaults() {
        let s: Settings = serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s, Settings::default());
        let s: Settings =
            serde_json::from_str(r#"{"padding":"strong"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.padding, Padding::Strong);
        assert!(!s.lan && s.tor && !s.compat);
        assert!(!s.hold.use_holders && !s.hold.offer);
        assert_eq!(s.hold.ttl_secs(), crate::hold::DEFAULT_TTL_SECS);
    }
}
