//! Names of nodes, locations and external peers. Locations and peers are DNS-1123
//! labels. Node names are DNS-1123 subdomains (dot-separated labels, at most 253
//! characters), because that is what Kubernetes names nodes (`ip-10-0-0-1.ec2.internal`)
//! and a node's name must be its Node object's. Nothing derives an interface or file
//! name from a node name (interfaces are named by flag, registry keys allow dots), so
//! the dots are safe.

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

/// A DNS-1123 subdomain: labels joined by dots, 253 characters at most.
fn check_subdomain(field: &str, s: &str) -> Result<(), FieldError> {
    if s.len() > 253 {
        return Err(FieldError::new(
            field,
            format!("{s:?} is longer than 253 characters"),
        ));
    }
    s.split('.').try_for_each(|label| {
        check_label(field, label).map_err(|_| {
            FieldError::new(
                field,
                format!("{s:?} is not a DNS name (dot-separated labels of lowercase letters, digits and '-', not at either end)"),
            )
        })
    })
}

macro_rules! label_type {
    ($(#[$doc:meta])* $ty:ident, $field:literal, $check:ident) => {
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
                $check($field, &s)?;
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
    /// A node's name, unique in the cluster: a DNS subdomain, as Kubernetes node names are.
    NodeName,
    "name",
    check_subdomain
);
label_type!(
    /// A site: nodes of one location share a private network.
    Location,
    "location",
    check_label
);
label_type!(
    /// A device outside the cluster (laptop, VM, phone) that joins the mesh.
    PeerName,
    "name",
    check_label
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!("a1".parse::<NodeName>().is_ok());
        assert!("edge-2".parse::<Location>().is_ok());
        for bad in ["", "-a", "a-", "A1", "a_b", &"x".repeat(64), "a.b"] {
            let err = bad.parse::<PeerName>().unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
            assert!(bad.parse::<Location>().is_err(), "{bad}");
        }
    }

    /// Kubernetes names nodes with DNS subdomains; each label is still checked.
    #[test]
    fn node_names_are_dns_subdomains() {
        let long_ok = vec!["x".repeat(63); 3].join(".") + "." + &"y".repeat(61);
        for ok in [
            "a1",
            "ip-10-0-0-1.ec2.internal",
            "node.example.com",
            &long_ok,
        ] {
            assert_eq!(ok.parse::<NodeName>().unwrap().as_str(), ok);
        }
        let too_long = long_ok.clone() + "y";
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "-a.b",
            "a.b-",
            "a.-b",
            "A.b",
            "a_b.c",
            &format!("{}.a", "x".repeat(64)),
            &too_long,
        ] {
            let err = bad.parse::<NodeName>().unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
        }
    }
}
