//! Files of one entry a line (thumbprint lists, address lists): `#` starts a comment, blank
//! lines are skipped, and errors name the file and the line: the first few, then how many more.

use std::path::Path;
use std::sync::Arc;

use portcullis_config::{ConfigErrors, Loc};

/// Errors listed for one file before the rest are summarised.
pub(crate) const MAX_REPORTED: usize = 20;

/// Hands each entry of `text` (comment removed, trimmed) to `entry`, and locates its errors at
/// the entry's line of `file`; `loc` is where the configuration names the file.
pub(crate) fn read_entries(
    text: &[u8],
    file: &Path,
    loc: &Loc,
    mut entry: impl FnMut(&[u8]) -> Result<(), String>,
) -> ConfigErrors {
    let file: Arc<Path> = Arc::from(file);
    let mut errors = ConfigErrors::default();
    let mut bad = 0usize;
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = match raw.iter().position(|&b| b == b'#') {
            Some(hash) => &raw[..hash],
            None => raw,
        };
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if let Err(message) = entry(line) {
            bad += 1;
            if bad <= MAX_REPORTED {
                let at = Loc { file: file.clone(), line: i as u32 + 1, column: 1, field: loc.field.clone() };
                errors.push(at.error(message));
            }
        }
    }
    if bad > MAX_REPORTED {
        let at = Loc { file, line: 0, column: 0, field: loc.field.clone() };
        errors.push(at.error(format!("… and {} more invalid lines", bad - MAX_REPORTED)));
    }
    errors
}
