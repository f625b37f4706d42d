//! No VPN: the baseline. The master routes each directly reachable worker's pod
//! CIDR via that worker's underlay address, in plaintext; a worker behind NAT is
//! out of reach, as it would be without a VPN.

use std::process::Command;

use super::{Bed, Shape, Vpn, VpnError};

#[derive(Default)]
pub struct NoVpn {
    /// `(master netns, pod CIDR)` of each route `up` added.
    routes: Vec<(String, String)>,
}

const NAME: &str = "none";

fn ip(args: &[&str]) -> Result<(), VpnError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| setup(args, e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(setup(
            args,
            String::from_utf8_lossy(&out.stderr).trim().into(),
        ))
    }
}

fn setup(args: &[&str], reason: String) -> VpnError {
    VpnError::Setup {
        vpn: NAME,
        what: format!("ip {}", args.join(" ")),
        reason,
    }
}

impl Vpn for NoVpn {
    fn name(&self) -> &'static str {
        NAME
    }

    fn shapes(&self) -> &'static [Shape] {
        &[Shape::Mesh]
    }

    fn check_installed(&self) -> Result<(), VpnError> {
        Ok(())
    }

    fn packages(&self) -> &'static [&'static str] {
        &[]
    }

    fn up(&mut self, bed: &Bed, _shape: Shape) -> Result<(), VpnError> {
        let master = bed.master();
        for w in bed.workers().filter(|w| !w.behind_nat) {
            let cidr = w.pod_cidr.expect("workers have pod CIDRs").to_string();
            let via = w.underlay.to_string();
            ip(&["-n", &master.netns, "route", "replace", &cidr, "via", &via])?;
            self.routes.push((master.netns.clone(), cidr));
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn down(&mut self) -> Result<(), VpnError> {
        for (ns, cidr) in self.routes.drain(..) {
            // Gone with its namespace, or never made: nothing to undo.
            let _ = ip(&["-n", &ns, "route", "del", &cidr]);
        }
        Ok(())
    }
}
