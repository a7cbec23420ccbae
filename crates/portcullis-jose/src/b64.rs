//! Strict base64url without padding (RFC 7515 §2, RFC 4648 §5): no padding, no whitespace, no
//! characters of the other alphabet, and no set bits after the last whole byte.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// Why a text is not base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBase64;

/// Decodes `text`.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, NotBase64> {
    URL_SAFE_NO_PAD.decode(text).map_err(|_| NotBase64)
}

/// Decodes `text` into `out` (cleared first), reusing its allocation.
pub fn decode_into(text: &[u8], out: &mut Vec<u8>) -> Result<(), NotBase64> {
    out.clear();
    URL_SAFE_NO_PAD.decode_vec(text, out).map_err(|_| NotBase64)
}

/// Decodes standard base64 with padding (RFC 4648 §4), as secrets are written in configurations.
pub fn decode_standard(text: &[u8]) -> Result<Vec<u8>, NotBase64> {
    STANDARD.decode(text).map_err(|_| NotBase64)
}

/// Encodes `bytes` (for tests and tools that make tokens).
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict() {
        assert_eq!(decode(b"Zm9v"), Ok(b"foo".to_vec()));
        assert_eq!(decode(b"Zm8"), Ok(b"fo".to_vec()));
        assert_eq!(decode(b"-_8"), Ok(vec![0xfb, 0xff]));
        assert_eq!(decode(b""), Ok(Vec::new()));
        for bad in [&b"Zm8="[..], b"Zm 8", b"+/8", b"Zm9", b"Z", b"Zm9v\n"] {
            assert_eq!(decode(bad), Err(NotBase64), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(encode(b"fo"), "Zm8");
    }
}
