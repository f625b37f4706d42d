//! `wiremesh bench edge`: the edge-VPN testbed of Goethals et al. (CNSM 2019) in
//! network namespaces on one host, with every VPN a user could pick side by side.

pub mod vpn;
