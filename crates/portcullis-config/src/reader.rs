//! A walker over toml's spanned document that turns values into typed fields and collects every
//! error with its file, line and field, instead of stopping at the first as serde would.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{ConfigErrors, Loc};
use crate::model::Located;

pub(crate) type Value<'a> = Spanned<DeValue<'a>>;

pub(crate) struct Reader {
    file: Arc<Path>,
    base_dir: PathBuf,
    line_starts: Vec<usize>,
    pub(crate) errors: ConfigErrors,
}

impl Reader {
    pub(crate) fn new(file: &Path, text: &str) -> Reader {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Reader { file: Arc::from(file), base_dir, line_starts, errors: ConfigErrors::default() }
    }

    pub(crate) fn loc(&self, span: &Range<usize>, field: &str) -> Loc {
        let line = self.line_starts.partition_point(|&s| s <= span.start);
        let col = span.start - self.line_starts[line.saturating_sub(1)] + 1;
        Loc { file: self.file.clone(), line: line as u32, column: col as u32, field: field.to_owned() }
    }

    pub(crate) fn error(&mut self, span: &Range<usize>, field: &str, message: impl Into<String>) {
        let e = self.loc(span, field).error(message);
        self.errors.push(e);
    }

    /// Reports keys of `table` that are not in `known`, suggesting the closest known one.
    pub(crate) fn check_keys(&mut self, table: &DeTable<'_>, prefix: &str, known: &[&str]) {
        for (key, _) in table.iter() {
            let name: &str = key.get_ref();
            if known.contains(&name) {
                continue;
            }
            let hint = closest(name, known).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_else(|| {
                format!(" (known: {})", known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))
            });
            self.error(&key.span(), &join(prefix, name), format!("unknown field `{name}`{hint}"));
        }
    }

    fn type_error(&mut self, v: &Value<'_>, field: &str, expected: &str) {
        self.error(&v.span(), field, format!("expected {expected}, found {}", v.get_ref().type_str()));
    }

    pub(crate) fn table<'v, 'a>(&mut self, v: &'v Value<'a>, field: &str) -> Option<&'v DeTable<'a>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.type_error(v, field, "a table");
                None
            }
        }
    }

    /// An array of tables (`[[listener]]`), or a single table taken as one element.
    pub(crate) fn tables<'v, 'a>(&mut self, v: &'v Value<'a>, field: &str) -> Vec<(&'v Value<'a>, String)> {
        match v.get_ref() {
            DeValue::Array(items) => {
                items.iter().enumerate().map(|(i, item)| (item, format!("{field}[{i}]"))).collect()
            }
            DeValue::Table(_) => vec![(v, field.to_owned())],
            _ => {
                self.type_error(v, field, "an array of tables");
                Vec::new()
            }
        }
    }

    pub(crate) fn string(&mut self, v: &Value<'_>, field: &str) -> Option<Located<String>> {
        match v.get_ref() {
            DeValue::String(s) => Some(Located::new(s.to_string(), self.loc(&v.span(), field))),
            _ => {
                self.type_error(v, field, "a string");
                None
            }
        }
    }

    pub(crate) fn non_empty_string(&mut self, v: &Value<'_>, field: &str) -> Option<Located<String>> {
        let s = self.string(v, field)?;
        if s.value.trim().is_empty() {
            self.error(&v.span(), field, "must not be empty");
            return None;
        }
        Some(s)
    }

    pub(crate) fn strings(&mut self, v: &Value<'_>, field: &str) -> Vec<Located<String>> {
        match v.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| self.non_empty_string(item, &format!("{field}[{i}]")))
                .collect(),
            DeValue::String(_) => self.non_empty_string(v, field).into_iter().collect(),
            _ => {
                self.type_error(v, field, "an array of strings");
                Vec::new()
            }
        }
    }

    pub(crate) fn boolean(&mut self, v: &Value<'_>, field: &str) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.type_error(v, field, "true or false");
                None
            }
        }
    }

    pub(crate) fn integer(&mut self, v: &Value<'_>, field: &str, range: Range<i64>) -> Option<i64> {
        let DeValue::Integer(i) = v.get_ref() else {
            self.type_error(v, field, "an integer");
            return None;
        };
        let digits = i.as_str().replace('_', "");
        let parsed = match digits.strip_prefix('+').unwrap_or(&digits) {
            // The prefix may or may not be there, and the digits may be missing (`0x` alone
            // reaches here): never slice, let the parse refuse.
            d if i.radix() != 10 => {
                let d = ["0x", "0o", "0b"].iter().find_map(|p| d.strip_prefix(p)).unwrap_or(d);
                i64::from_str_radix(d, i.radix()).ok()
            }
            d => d.parse::<i64>().ok(),
        };
        match parsed {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.error(
                    &v.span(),
                    field,
                    format!("must be an integer from {} to {}", range.start, range.end - 1),
                );
                None
            }
        }
    }

    /// A duration: `"250ms"`, `"10s"`, `"5m"`, `"1h"`, or an integer number of seconds.
    pub(crate) fn duration(&mut self, v: &Value<'_>, field: &str) -> Option<Duration> {
        match v.get_ref() {
            DeValue::Integer(_) => {
                self.integer(v, field, 0..i64::from(u32::MAX)).map(|s| Duration::from_secs(s as u64))
            }
            DeValue::String(s) => {
                match parse_duration(s) {
                    Some(d) => Some(d),
                    None => {
                        self.error(
                        &v.span(),
                        field,
                        format!("invalid duration \"{s}\" (use e.g. \"250ms\", \"10s\", \"5m\", \"1h\", \"30d\")"),
                    );
                        None
                    }
                }
            }
            _ => {
                self.type_error(v, field, "a duration such as \"10s\"");
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub(crate) fn choice<T: Copy>(&mut self, v: &Value<'_>, field: &str, options: &[(&str, T)]) -> Option<T> {
        let s = self.string(v, field)?;
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == s.value) {
            return Some(*t);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        self.error(
            &v.span(),
            field,
            format!("unknown value \"{}\"; expected one of {}", s.value, names.join(", ")),
        );
        None
    }

    /// A file path, resolved against the directory of the configuration file.
    pub(crate) fn path(&mut self, v: &Value<'_>, field: &str) -> Option<Located<PathBuf>> {
        let s = self.non_empty_string(v, field)?;
        Some(Located::new(self.resolve(&s.value), s.loc))
    }

    pub(crate) fn paths(&mut self, v: &Value<'_>, field: &str) -> Vec<Located<PathBuf>> {
        self.strings(v, field).into_iter().map(|s| Located::new(self.resolve(&s.value), s.loc)).collect()
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }
}

pub(crate) fn get<'v, 'a>(t: &'v DeTable<'a>, key: &str) -> Option<&'v Value<'a>> {
    t.get(key)
}

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") }
}

pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return None,
    };
    if !secs.is_finite() || !(0.0..=4.0e9).contains(&secs) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// The known name closest to a misspelt one, if it is close enough to be a likely typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = if ca == b[j] { prev } else { 1 + prev.min(row[j]).min(cur) };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("10 parsecs"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("client_certficate", &["client_certificate", "client_ca"]),
            Some("client_certificate")
        );
        assert_eq!(closest("zzz", &["bind", "crl"]), None);
    }
}
