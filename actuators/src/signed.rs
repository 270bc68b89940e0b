//! Signed messages between the controller and edge agents: broker write
//! access alone must not command a GPU.
//!
//! A signed message is the JSON envelope
//! `{"signed": <payload>, "hmac_sha256": "<hex>"}`, the HMAC-SHA256 of the
//! exact bytes of `<payload>` under a key both sides hold (a file, its first
//! line, at least [`MIN_KEY_CHARS`] characters: `openssl rand -hex 32`).
//! The signature covers the bytes as sent, so no canonical form is needed.
//! Commands, acks and the controller's heartbeat travel this way.
//!
//! Without a key (`insecure_unsigned_commands = true` on both sides) the
//! payload goes bare, as before; a receiver without a key takes either form.

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use std::path::Path;

/// The shortest key accepted, in characters.
pub const MIN_KEY_CHARS: usize = 32;

/// The shared command key. Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct CommandKey(Vec<u8>);

impl std::fmt::Debug for CommandKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandKey(***)")
    }
}

impl CommandKey {
    /// A key from its text (trimmed); at least [`MIN_KEY_CHARS`] characters.
    pub fn new(text: &str) -> Result<CommandKey, String> {
        let t = text.trim();
        if t.chars().count() < MIN_KEY_CHARS {
            return Err(format!(
                "the command key has {} characters, fewer than {MIN_KEY_CHARS} (make one with `openssl rand -hex 32`)",
                t.chars().count()
            ));
        }
        Ok(CommandKey(t.as_bytes().to_vec()))
    }

    /// The key in a file: its first line.
    pub fn load(path: &Path) -> Result<CommandKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        CommandKey::new(text.lines().next().unwrap_or("")).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// The hex HMAC-SHA256 of `bytes`.
    pub fn sign(&self, bytes: &[u8]) -> String {
        let mut m = self.mac();
        m.update(bytes);
        hex::encode(m.finalize().into_bytes())
    }

    /// Whether `sig_hex` is the HMAC of `bytes` (compared in constant time).
    pub fn verify(&self, bytes: &[u8], sig_hex: &str) -> bool {
        let Ok(sig) = hex::decode(sig_hex.trim()) else { return false };
        let mut m = self.mac();
        m.update(bytes);
        m.verify_slice(&sig).is_ok()
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    signed: &'a RawValue,
    hmac_sha256: String,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(borrow)]
    signed: &'a RawValue,
    #[serde(default)]
    hmac_sha256: Option<String>,
}

/// Why a message was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not JSON, or not the payload expected (the message says where).
    Malformed(String),
    /// A key is held but the message carries no signature.
    Unsigned,
    /// The signature does not match the payload under our key.
    BadSignature,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(e) => write!(f, "malformed: {e}"),
            Refusal::Unsigned => f.write_str("not signed (a command key is configured: unsigned messages are refused)"),
            Refusal::BadSignature => f.write_str("bad signature (not signed with our command key)"),
        }
    }
}

/// The bytes to publish for `payload`: the signed envelope with a key, the
/// bare payload without one.
pub fn seal<T: Serialize>(payload: &T, key: Option<&CommandKey>) -> Result<Vec<u8>, String> {
    let raw = serde_json::to_string(payload).map_err(|e| format!("cannot encode: {e}"))?;
    let Some(key) = key else { return Ok(raw.into_bytes()) };
    let sig = key.sign(raw.as_bytes());
    let raw = RawValue::from_string(raw).map_err(|e| format!("cannot encode: {e}"))?;
    serde_json::to_vec(&EnvelopeOut { signed: &raw, hmac_sha256: sig }).map_err(|e| format!("cannot encode: {e}"))
}

/// Read a message: with a key, only a correctly signed envelope is taken;
/// without one, an envelope (signature not checked) or the bare payload.
pub fn open<T: DeserializeOwned>(body: &[u8], key: Option<&CommandKey>) -> Result<T, Refusal> {
    let envelope = serde_json::from_slice::<EnvelopeIn>(body).ok();
    let payload: &[u8] = match (envelope.as_ref(), key) {
        (Some(env), Some(key)) => match &env.hmac_sha256 {
            None => return Err(Refusal::Unsigned),
            Some(sig) if key.verify(env.signed.get().as_bytes(), sig) => env.signed.get().as_bytes(),
            Some(_) => return Err(Refusal::BadSignature),
        },
        (None, Some(_)) => {
            return match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(_) => Err(Refusal::Unsigned),
                Err(e) => Err(Refusal::Malformed(e.to_string())),
            }
        }
        (Some(env), None) => env.signed.get().as_bytes(),
        (None, None) => body,
    };
    serde_json::from_slice(payload).map_err(|e| Refusal::Malformed(e.to_string()))
}

/// The `"id"` of a payload, signed or bare, when one can be read (to answer a
/// correctly signed command the receiver cannot parse).
pub fn payload_id(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let p = v.get("signed").unwrap_or(&v);
    p.get("id").and_then(|i| i.as_str()).map(str::to_string)
}

/// The controller's heartbeat, published every few seconds on
/// `<prefix>/controller/heartbeat` while its MQTT backend runs. An agent
/// that hears no valid one (nor a command) for its `failsafe_after_s`
/// unlocks its clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// When it was sent, milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

/// The heartbeat topic under a prefix.
pub fn heartbeat_topic(prefix: &str) -> String {
    format!("{}/controller/heartbeat", prefix.trim_end_matches('/'))
}

/// Whether a time stamp is within `ttl_ms` of `now_ms` (either side: a
/// controller clock ahead of ours counts as skew, not as freshness).
pub fn fresh(issued_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    issued_ms.abs_diff(now_ms) <= ttl_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, Command, InstanceId};

    fn key(c: char) -> CommandKey {
        CommandKey::new(&c.to_string().repeat(40)).unwrap()
    }

    #[test]
    fn signed_envelopes_open_only_under_their_key() {
        let cmd = Command::new("x-1", Action::SetClock { instance: InstanceId(1), clock_mhz: 1200 }, None);
        let k = key('a');
        let body = seal(&cmd, Some(&k)).unwrap();
        assert_eq!(open::<Command>(&body, Some(&k)).unwrap(), cmd);
        assert_eq!(open::<Command>(&body, Some(&key('b'))).unwrap_err(), Refusal::BadSignature);
        // Tampered: the clock changed after signing.
        let text = String::from_utf8(body.clone()).unwrap().replace("1200", "100");
        assert_eq!(open::<Command>(text.as_bytes(), Some(&k)).unwrap_err(), Refusal::BadSignature);
        // Bare or without the signature: refused when a key is held, taken without one.
        let bare = seal(&cmd, None).unwrap();
        assert_eq!(open::<Command>(&bare, Some(&k)).unwrap_err(), Refusal::Unsigned);
        assert_eq!(open::<Command>(&bare, None).unwrap(), cmd);
        assert_eq!(open::<Command>(&body, None).unwrap(), cmd);
        let nosig = format!("{{\"signed\": {}}}", String::from_utf8(bare).unwrap());
        assert_eq!(open::<Command>(nosig.as_bytes(), Some(&k)).unwrap_err(), Refusal::Unsigned);
        assert!(matches!(open::<Command>(b"{oops", Some(&k)), Err(Refusal::Malformed(_))));
        assert_eq!(payload_id(&body).as_deref(), Some("x-1"));
    }

    #[test]
    fn short_keys_are_refused_and_never_printed() {
        assert!(CommandKey::new("short").unwrap_err().contains("fewer than 32"));
        assert_eq!(format!("{:?}", key('z')), "CommandKey(***)");
        assert!(fresh(1_000, 31_000, 30_000) && fresh(31_000, 1_000, 30_000) && !fresh(0, 30_001, 30_000));
    }
}
