//! The protobuf messages of both versions (proto2, every field optional on
//! the wire; decoders check presence).

/// OMEMO 0.3 (libsignal's `WhisperMessage` / `PreKeyWhisperMessage`).
pub mod v03 {
    /// A ratchet message, sent as `0x33 ‖ Message ‖ mac[8]`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        /// Ratchet public key, `0x05 ‖ 32 bytes`.
        #[prost(bytes = "vec", optional, tag = "1")]
        pub dh_pub: Option<Vec<u8>>,
        /// Index in the sending chain.
        #[prost(uint32, optional, tag = "2")]
        pub n: Option<u32>,
        /// Length of the previous sending chain.
        #[prost(uint32, optional, tag = "3")]
        pub pn: Option<u32>,
        /// AES-256-CBC ciphertext of the key material.
        #[prost(bytes = "vec", optional, tag = "4")]
        pub ciphertext: Option<Vec<u8>>,
    }

    /// A key exchange, sent as `0x33 ‖ KeyExchange`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyExchange {
        /// One-time prekey id.
        #[prost(uint32, optional, tag = "1")]
        pub pk_id: Option<u32>,
        /// Ephemeral key, `0x05 ‖ 32 bytes`.
        #[prost(bytes = "vec", optional, tag = "2")]
        pub ek: Option<Vec<u8>>,
        /// Sender identity key, `0x05 ‖ 32 bytes` (Montgomery form).
        #[prost(bytes = "vec", optional, tag = "3")]
        pub ik: Option<Vec<u8>>,
        /// The first ratchet message (with its version byte and MAC).
        #[prost(bytes = "vec", optional, tag = "4")]
        pub message: Option<Vec<u8>>,
        /// Registration id; unused by OMEMO.
        #[prost(uint32, optional, tag = "5")]
        pub unused: Option<u32>,
        /// Signed prekey id.
        #[prost(uint32, optional, tag = "6")]
        pub spk_id: Option<u32>,
    }
}

/// OMEMO 2.
pub mod v2 {
    /// A ratchet message.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        /// Index in the sending chain.
        #[prost(uint32, optional, tag = "1")]
        pub n: Option<u32>,
        /// Length of the previous sending chain.
        #[prost(uint32, optional, tag = "2")]
        pub pn: Option<u32>,
        /// Ratchet public key.
        #[prost(bytes = "vec", optional, tag = "3")]
        pub dh_pub: Option<Vec<u8>>,
        /// AES-256-CBC ciphertext of the key material.
        #[prost(bytes = "vec", optional, tag = "4")]
        pub ciphertext: Option<Vec<u8>>,
    }

    /// A ratchet message with its MAC.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AuthenticatedMessage {
        /// Truncated HMAC-SHA-256 (16 bytes).
        #[prost(bytes = "vec", optional, tag = "1")]
        pub mac: Option<Vec<u8>>,
        /// Serialized [`Message`].
        #[prost(bytes = "vec", optional, tag = "2")]
        pub message: Option<Vec<u8>>,
    }

    /// A key exchange.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyExchange {
        /// One-time prekey id.
        #[prost(uint32, optional, tag = "1")]
        pub pk_id: Option<u32>,
        /// Signed prekey id.
        #[prost(uint32, optional, tag = "2")]
        pub spk_id: Option<u32>,
        /// Sender identity key (Ed25519).
        #[prost(bytes = "vec", optional, tag = "3")]
        pub ik: Option<Vec<u8>>,
        /// Ephemeral key.
        #[prost(bytes = "vec", optional, tag = "4")]
        pub ek: Option<Vec<u8>>,
        /// The first ratchet message.
        #[prost(message, optional, tag = "5")]
        pub message: Option<AuthenticatedMessage>,
    }
}
