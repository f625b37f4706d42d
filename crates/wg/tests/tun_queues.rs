//! The TUN device's queue fallbacks in a real network namespace: a device the kernel
//! gives fewer queues than asked for, and one it refuses multi-queue altogether,
//! still start, with the queues they have.

use wiremesh_testkit::{require_root, Netns};
use wiremesh_wg::tun::{Offload, Tun};

/// The kernel's limit on one TUN device's queues (`MAX_TAP_QUEUES`).
const KERNEL_MAX_QUEUES: usize = 256;

#[test]
fn more_queues_than_the_kernel_allows_gives_its_maximum() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("tunq").expect("namespace");
    let queues = ns
        .run(|| Tun::create_queues("wmq0", Offload::Tcp, KERNEL_MAX_QUEUES + 10))
        .unwrap()
        .expect("a device with the queues the kernel allows");
    assert_eq!(queues.len(), KERNEL_MAX_QUEUES);
    assert!(queues.iter().all(|q| q.name() == "wmq0"));
    let link = ns
        .exec_ok(&["ip", "-details", "link", "show", "wmq0"])
        .unwrap();
    assert!(link.contains("multi_queue"), "{link}");
}

#[test]
fn an_existing_single_queue_device_is_used_with_one_queue() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("tun1").expect("namespace");
    // A persistent device made without IFF_MULTI_QUEUE: the kernel refuses to attach
    // a multi-queue descriptor to it.
    ns.exec_ok(&["ip", "tuntap", "add", "dev", "wm1q", "mode", "tun"])
        .unwrap();
    let queues = ns
        .run(|| Tun::create_queues("wm1q", Offload::Tcp, 4))
        .unwrap()
        .expect("the existing device, with one queue");
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].name(), "wm1q");
    let link = ns
        .exec_ok(&["ip", "-details", "link", "show", "wm1q"])
        .unwrap();
    assert!(!link.contains("multi_queue"), "{link}");
}
