//! WireGuard key types: the peer's static public key, the device's private key and
//! the optional per-peer preshared key.
//!
//! UAPI carries keys as 64 hex digits, `wg` and configuration files as 44 base64
//! characters; every key type reads and writes both. Secret keys zeroize their bytes
//! on drop, print as `[redacted]` in `Debug`, and compare in constant time so that
//! a comparison cannot leak how many leading bytes matched.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Length in bytes of every WireGuard key (Curve25519 points and scalars, and PSKs).
pub const KEY_LEN: usize = 32;

/// Why a key string was rejected. Never carries the key text itself: it may be secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 44 characters of standard base64 decoding to 32 bytes.
    #[error("invalid base64 key: expected 44 characters encoding 32 bytes")]
    Base64,
    /// Not exactly 64 hexadecimal digits.
    #[error("invalid hex key: expected 64 hexadecimal digits")]
    Hex,
}

fn decode_base64(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    // A 32-byte key is always 44 characters with one '=' of padding; checking the
    // length first bounds the work done on hostile input.
    if s.len() != 44 {
        return Err(KeyError::Base64);
    }
    let mut out = [0u8; KEY_LEN];
    match BASE64.decode_slice(s, &mut out) {
        Ok(KEY_LEN) => Ok(out),
        _ => {
            out.zeroize();
            Err(KeyError::Base64)
        }
    }
}

fn decode_hex(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.len() != 2 * KEY_LEN {
        return Err(KeyError::Hex);
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::Hex)?;
    Ok(out)
}

/// The base64 (`wg`, config files) and hex (UAPI) forms and the raw bytes, shared by
/// every key type.
macro_rules! key_encodings {
    ($name:ident) => {
        impl $name {
            /// Parses the 44-character base64 form used by `wg` and configuration files.
            pub fn from_base64(s: &str) -> Result<Self, KeyError> {
                decode_base64(s).map(Self)
            }

            /// Renders the base64 form (for a secret, the caller owns what it returns).
            pub fn to_base64(&self) -> String {
                BASE64.encode(self.0)
            }

            /// Parses the 64-digit hex form used by UAPI.
            pub fn from_hex(s: &str) -> Result<Self, KeyError> {
                decode_hex(s).map(Self)
            }

            /// Renders the lowercase hex form used by UAPI.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }
    };
}

/// A peer's (or the device's) Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

key_encodings!(PublicKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl From<[u8; KEY_LEN]> for PublicKey {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A 32-byte secret: zeroized on drop, compared in constant time, redacted in `Debug`,
/// with the base64 and hex (UAPI) forms. One definition for both kinds of secret.
macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Wraps raw bytes.
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// UAPI uses an all-zero key to mean "no key".
            pub fn is_zero(&self) -> bool {
                self.0.ct_eq(&[0u8; KEY_LEN]).into()
            }
        }

        key_encodings!($name);

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_key!(
    /// The device's Curve25519 private key. Zeroized on drop; `Debug` is redacted.
    PrivateKey
);

secret_key!(
    /// An optional symmetric key mixed into the handshake (whitepaper §5.2). Zeroized on
    /// drop; `Debug` is redacted.
    PresharedKey
);

impl PrivateKey {
    /// A fresh random key from the operating system's CSPRNG, clamped like `wg genkey`.
    pub fn generate() -> Self {
        let mut bytes = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng).to_bytes();
        // Clamping (RFC 7748 §5) is what `wg genkey` does; x25519 clamps on use anyway,
        // so this only makes generated keys look like everyone else's.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// The matching public key (X25519 base-point multiplication).
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl PresharedKey {
    /// A fresh random key from the operating system's CSPRNG, like `wg genpsk`.
    pub fn generate() -> Self {
        use rand_core::RngCore as _;
        let mut bytes = [0u8; KEY_LEN];
        rand_core::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1 test vector (Alice).
    const ALICE_PRIV_HEX: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB_HEX: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    #[test]
    fn public_key_from_private_matches_rfc7748() {
        let k = PrivateKey::from_hex(ALICE_PRIV_HEX).unwrap();
        assert_eq!(k.public_key().to_hex(), ALICE_PUB_HEX);
    }

    #[test]
    fn round_trips_hex_and_base64() {
        let k = PublicKey::from_hex(ALICE_PUB_HEX).unwrap();
        let b64 = k.to_base64();
        assert_eq!(b64.len(), 44);
        assert_eq!(PublicKey::from_base64(&b64).unwrap(), k);
        assert_eq!(b64.parse::<PublicKey>().unwrap(), k);
        assert_eq!(k.to_string(), b64);
        let p = PrivateKey::generate();
        assert_eq!(PrivateKey::from_base64(&p.to_base64()).unwrap(), p);
        assert_eq!(PrivateKey::from_hex(&p.to_hex()).unwrap(), p);
        let s = PresharedKey::generate();
        assert_eq!(PresharedKey::from_hex(&s.to_hex()).unwrap(), s);
        assert_eq!(PresharedKey::from_base64(&s.to_base64()).unwrap(), s);
    }

    #[test]
    fn rejects_bad_keys() {
        let cases: &[&str] = &[
            "",
            "abc",
            &"g".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &"é".repeat(32),
        ];
        for c in cases {
            assert_eq!(PublicKey::from_hex(c), Err(KeyError::Hex), "{c:?}");
        }
        let b64_cases: &[&str] = &[
            "",
            &"A".repeat(43),
            &"A".repeat(44),
            &"A".repeat(45),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
        ];
        for c in b64_cases {
            assert_eq!(PublicKey::from_base64(c), Err(KeyError::Base64), "{c:?}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let p = PrivateKey::from_hex(ALICE_PRIV_HEX).unwrap();
        let s = PresharedKey::from_hex(ALICE_PRIV_HEX).unwrap();
        for text in [format!("{p:?}"), format!("{s:?}")] {
            assert!(text.contains("redacted"));
            assert!(!text.contains("77076d"));
            assert!(!text.contains(&p.to_base64()));
        }
    }

    #[test]
    fn zero_keys_are_detected() {
        assert!(PrivateKey::from_bytes([0; 32]).is_zero());
        assert!(!PrivateKey::generate().is_zero());
        assert!(PresharedKey::from_bytes([0; 32]).is_zero());
    }

    #[test]
    fn generated_keys_differ_and_are_clamped() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xc0, 0x40);
    }

    #[test]
    fn public_key_serde_is_base64_string() {
        let k = PublicKey::from_hex(ALICE_PUB_HEX).unwrap();
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{}\"", k.to_base64()));
        let back: PublicKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, k);
        assert!(serde_json::from_str::<PublicKey>("\"nope\"").is_err());
    }
}
