//! Parsers for single UAPI values, each naming its key in the error it returns.

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::{PresharedKey, PrivateKey, PublicKey, UapiError};

fn invalid(key: &'static str, reason: &'static str) -> UapiError {
    UapiError::InvalidValue { key, reason }
}

pub(crate) fn number<T: std::str::FromStr>(
    key: &'static str,
    value: &str,
    reason: &'static str,
) -> Result<T, UapiError> {
    // `FromStr` for integers accepts a leading '+'; UAPI is plain decimal digits.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(key, reason));
    }
    value.parse().map_err(|_| invalid(key, reason))
}

/// Boolean flags only ever take the value `true` (wireguard-go rejects anything else).
pub(crate) fn flag(key: &'static str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(key, "expected true"))
    }
}

pub(crate) fn public_key(key: &'static str, value: &str) -> Result<PublicKey, UapiError> {
    PublicKey::from_hex(value).map_err(|_| invalid(key, "expected 64 hex digits"))
}

pub(crate) fn private_key(key: &'static str, value: &str) -> Result<PrivateKey, UapiError> {
    PrivateKey::from_hex(value).map_err(|_| invalid(key, "expected 64 hex digits"))
}

pub(crate) fn preshared_key(key: &'static str, value: &str) -> Result<PresharedKey, UapiError> {
    PresharedKey::from_hex(value).map_err(|_| invalid(key, "expected 64 hex digits"))
}

pub(crate) fn endpoint(key: &'static str, value: &str) -> Result<SocketAddr, UapiError> {
    value
        .parse()
        .map_err(|_| invalid(key, "expected IP:PORT or [IPv6]:PORT"))
}

pub(crate) fn allowed_ip(key: &'static str, value: &str) -> Result<IpNet, UapiError> {
    value
        .parse()
        .map_err(|_| invalid(key, "expected ADDRESS/PREFIX"))
}

pub(crate) fn protocol_version(key: &'static str, value: &str) -> Result<u32, UapiError> {
    match number::<u32>(key, value, "expected 1")? {
        1 => Ok(1),
        _ => Err(invalid(key, "only protocol version 1 exists")),
    }
}
