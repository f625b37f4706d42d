//! Names of nodes, locations and external peers: DNS-1123 labels, so they can be
//! Kubernetes object names, interface-name suffixes and DNS labels alike.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::FieldError;

fn check_label(field: &str, s: &str) -> Result<(), FieldError> {
    if s.is_empty() || s.len() > 63 {
        return Err(FieldError::new(
            field,
            format!("{s:?} must be 1 to 63 characters"),
        ));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(FieldError::new(
            field,
            format!(
                "{s:?} is not a DNS label (lowercase letters, digits and '-', not at either end)"
            ),
        ));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $ty:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = FieldError;
            fn try_from(s: String) -> Result<Self, FieldError> {
                check_label($field, &s)?;
                Ok($ty(s))
            }
        }

        impl std::str::FromStr for $ty {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

label_type!(
    /// A node's name, unique in the cluster.
    NodeName,
    "name"
);
label_type!(
    /// A site: nodes of one location share a private network.
    Location,
    "location"
);
label_type!(
    /// A device outside the cluster (laptop, VM, phone) that joins the mesh.
    PeerName,
    "name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!("a1".parse::<NodeName>().is_ok());
        assert!("edge-2".parse::<Location>().is_ok());
        for bad in ["", "-a", "a-", "A1", "a_b", &"x".repeat(64)] {
            let err = bad.parse::<NodeName>().unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
        }
    }
}
