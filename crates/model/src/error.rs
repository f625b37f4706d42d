//! The one error type of the model: which field of which record was wrong, and why.

use std::fmt;

/// A value that failed validation. `field` is a dotted path such as
/// `node.pod_cidr`, so the user can find it in the record they wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// Prefix the field path, e.g. `pod_cidr` inside node `a1` becomes `node a1: pod_cidr`.
    pub fn within(mut self, context: &str) -> Self {
        self.field = format!("{context}.{}", self.field);
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.reason)
    }
}
