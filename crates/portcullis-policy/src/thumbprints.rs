//! Thumbprint allow-lists: files of hex thumbprints compiled into hash sets of fixed-size arrays.

use std::path::Path;

use ahash::AHashSet;
use portcullis_config::{ConfigErrors, Loc};

use crate::list_file::read_entries;

/// A compiled `[thumbprints]` list.
///
/// The file has one thumbprint per line: 40 hex digits (SHA-1, as APIM shows them) or 64 (SHA-256),
/// in any case, optionally with `:` or spaces between bytes. `#` starts a comment; blank lines
/// are ignored.
#[derive(Debug, Default)]
pub struct ThumbprintSet {
    sha1: AHashSet<[u8; 20]>,
    sha256: AHashSet<[u8; 32]>,
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex digits (skipping `:` and blanks) into `out`; returns the number of digits seen,
/// or `None` on a character that is not hex.
fn decode(line: &[u8], out: &mut [u8; 32]) -> Option<usize> {
    let mut digits = 0;
    for &b in line {
        if b == b':' || b == b' ' || b == b'\t' {
            continue;
        }
        let v = hex_nibble(b)?;
        if digits < 64 {
            let byte = &mut out[digits / 2];
            *byte = if digits % 2 == 0 { v << 4 } else { *byte | v };
        }
        digits += 1;
    }
    Some(digits)
}

impl ThumbprintSet {
    /// Compiles the contents of a list file. `loc` is where the configuration names it; errors
    /// point at the file's own lines.
    pub fn parse(text: &[u8], file: &Path, loc: &Loc) -> Result<ThumbprintSet, ConfigErrors> {
        let mut set = ThumbprintSet::default();
        let errors = read_entries(text, file, loc, |line| {
            let mut bytes = [0u8; 32];
            let message = match decode(line, &mut bytes) {
                Some(40) => {
                    let mut t = [0u8; 20];
                    t.copy_from_slice(&bytes[..20]);
                    set.sha1.insert(t);
                    return Ok(());
                }
                Some(64) => {
                    set.sha256.insert(bytes);
                    return Ok(());
                }
                Some(n) => format!("{n} hex digits; a thumbprint has 40 (SHA-1) or 64 (SHA-256)"),
                None => "not a hex thumbprint".to_owned(),
            };
            let shown: String = String::from_utf8_lossy(line).chars().take(80).collect();
            Err(format!("\"{shown}\": {message}"))
        });
        errors.into_result(set)
    }

    /// Reads and compiles a list file.
    pub fn load(path: &Path, loc: &Loc) -> Result<ThumbprintSet, ConfigErrors> {
        let text =
            std::fs::read(path).map_err(|e| loc.error(format!("cannot read {}: {e}", path.display())))?;
        ThumbprintSet::parse(&text, path, loc)
    }

    pub fn contains_sha1(&self, thumbprint: &[u8; 20]) -> bool {
        self.sha1.contains(thumbprint)
    }

    pub fn contains_sha256(&self, thumbprint: &[u8; 32]) -> bool {
        self.sha256.contains(thumbprint)
    }

    /// Number of thumbprints (both kinds).
    pub fn len(&self) -> usize {
        self.sha1.len() + self.sha256.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_with_comments_and_separators() {
        let text = b"# devices\n\
            7D14CAD67E6034519621E1462CF153A2C70EBFDF\n\
            7d:14:ca:d6:7e:60:34:51:96:21:e1:46:2c:f1:53:a2:c7:0e:bf:de   # device 2\n\
            \n\
            0000000000000000000000000000000000000000000000000000000000000001\n";
        let set = ThumbprintSet::parse(text, Path::new("l.txt"), &Loc::builtin("thumbprints.devices"))
            .expect("valid");
        assert_eq!(set.len(), 3);
        let mut t = [0u8; 20];
        t.copy_from_slice(&[
            0x7d, 0x14, 0xca, 0xd6, 0x7e, 0x60, 0x34, 0x51, 0x96, 0x21, 0xe1, 0x46, 0x2c, 0xf1, 0x53, 0xa2,
            0xc7, 0x0e, 0xbf, 0xdf,
        ]);
        assert!(set.contains_sha1(&t));
        t[19] = 0xde;
        assert!(set.contains_sha1(&t));
        t[19] = 0xdd;
        assert!(!set.contains_sha1(&t));
        let mut s = [0u8; 32];
        s[31] = 1;
        assert!(set.contains_sha256(&s));
    }

    #[test]
    fn bad_lines_are_located() {
        let text = b"7D14CAD67E6034519621E1462CF153A2C70EBFDF\nnot-hex\nABCD\n";
        let e = ThumbprintSet::parse(text, Path::new("l.txt"), &Loc::builtin("thumbprints.devices"))
            .expect_err("invalid");
        let all = e.to_string();
        assert!(all.contains("l.txt:2:1: thumbprints.devices: \"not-hex\": not a hex thumbprint"), "{all}");
        assert!(all.contains("l.txt:3:1:"), "{all}");
    }
}
