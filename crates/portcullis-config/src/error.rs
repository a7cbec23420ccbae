use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Where a value came from: file, line, column and the dotted field path
/// (`listener[0].client_certificate`). Every later stage that finds something wrong with a
/// value (a certificate that does not load, a backend name that does not exist) reports it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<Path>,
    pub line: u32,
    pub column: u32,
    pub field: String,
}

impl Loc {
    /// A location for values that come from no file (built-in defaults, the demo).
    pub fn builtin(field: impl Into<String>) -> Loc {
        Loc { file: Arc::from(Path::new("<built-in>")), line: 0, column: 0, field: field.into() }
    }

    /// The same place, one field deeper.
    pub fn child(&self, field: &str) -> Loc {
        Loc { field: format!("{}.{field}", self.field), ..self.clone() }
    }

    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError { loc: self.clone(), message: message.into() }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.field)
    }
}

/// One problem with the configuration, or with a file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub loc: Loc,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.loc.field.is_empty() {
            write!(f, "{}:{}:{}: {}", self.loc.file.display(), self.loc.line, self.loc.column, self.message)
        } else {
            write!(f, "{}: {}", self.loc, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// All the problems found in one load: a load reports every error it can find, not the first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }

    pub fn extend(&mut self, other: ConfigErrors) {
        self.0.extend(other.0);
    }

    /// Orders errors by file and line, the order an operator reads a file in.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| {
            (&a.loc.file, a.loc.line, a.loc.column).cmp(&(&b.loc.file, b.loc.line, b.loc.column))
        });
    }

    /// Drops repeated errors (the same message at the same place, as when one file is named for
    /// a listener and each of its SNI entries), keeping the first of each.
    pub fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.0.retain(|e| seen.insert((e.loc.file.clone(), e.loc.line, e.loc.column, e.message.clone())));
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    /// `Ok(v)` when nothing was reported.
    pub fn into_result<T>(mut self, v: T) -> Result<T, ConfigErrors> {
        if self.is_empty() {
            Ok(v)
        } else {
            self.sort();
            Err(self)
        }
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
