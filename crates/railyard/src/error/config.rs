//! [`ConfigError`]: a configuration value that could not be accepted, shown
//! only when it is safe to.

use super::*;

/// A configuration value that could not be accepted.
///
/// The message names the field (the environment variable, URL part or builder
/// setter the user wrote) and, when it is safe to, the offending value. A value
/// is never shown when it is or may hold a secret: passwords, values of unknown
/// URL parameters, anything containing `@` or `://` (the shapes of credentials
/// and URLs), and any part of a URL whose shape suggests a misplaced password.
/// Shown values are cut to [`ConfigError::MAX_SHOWN`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The field (URL parameter, environment variable or builder setter) at fault.
    pub field: String,
    /// The offending value as given (cut to [`ConfigError::MAX_SHOWN`]
    /// characters), or empty when it is not shown.
    pub value: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

impl ConfigError {
    /// The most characters of an offending value an error shows.
    pub const MAX_SHOWN: usize = 64;

    /// An error showing `value`, unless it looks like it may hold a secret.
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: shown(value.into()),
            reason: reason.into(),
        }
    }

    /// An error that shows nothing of the value.
    pub fn hidden(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            value: String::new(),
            reason: reason.into(),
        }
    }

    /// The same error without its value.
    pub(crate) fn without_value(mut self) -> Self {
        self.value.clear();
        self
    }
}

/// What of a value an error may show: nothing when it could hold credentials,
/// else at most [`ConfigError::MAX_SHOWN`] characters.
pub(super) fn shown(value: String) -> String {
    if value.contains('@') || value.contains("://") {
        return String::new();
    }
    match value.char_indices().nth(ConfigError::MAX_SHOWN) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value,
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "invalid {}: {}", self.field, self.reason)
        } else {
            write!(
                f,
                "invalid {} {:?}: {}",
                self.field, self.value, self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}
