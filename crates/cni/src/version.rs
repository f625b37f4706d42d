//! CNI spec versions: which ones this plugin speaks and what changes between them.
//!
//! Results differ by version: before 1.0.0 each entry of `ips` carries `"version":
//! "4"`; from 1.1.0 interfaces may carry their `mtu`. CHECK exists from 0.4.0, GC and
//! STATUS from 1.1.0.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    pub const LATEST: Version = Version(1, 1, 0);
    pub const CHECK: Version = Version(0, 4, 0);
    pub const V1: Version = Version(1, 0, 0);
    pub const GC_STATUS: Version = Version(1, 1, 0);
    /// Versions with the result format this plugin can write (0.3.0 is the first with
    /// `interfaces` and interface indexes in `ips`).
    pub const SUPPORTED: [Version; 5] = [
        Version(0, 3, 0),
        Version(0, 3, 1),
        Version(0, 4, 0),
        Version(1, 0, 0),
        Version(1, 1, 0),
    ];

    pub fn supported_list() -> String {
        Self::SUPPORTED
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl FromStr for Version {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.').map(|p| p.parse::<u16>().map_err(|_| ()));
        let v = Version(
            parts.next().ok_or(())??,
            parts.next().ok_or(())??,
            parts.next().ok_or(())??,
        );
        if parts.next().is_some() {
            return Err(());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!("1.1.0".parse(), Ok(Version(1, 1, 0)));
        assert_eq!("0.3.1".parse(), Ok(Version(0, 3, 1)));
        assert!("1.1".parse::<Version>().is_err());
        assert!("1.1.0.0".parse::<Version>().is_err());
        assert!("x.1.0".parse::<Version>().is_err());
        assert!(Version(0, 4, 0) < Version(1, 0, 0));
        assert_eq!(Version::LATEST.to_string(), "1.1.0");
    }
}
