//! Cryptokey routing table: a longest-prefix-match map from IP prefixes to peers
//! (whitepaper §2).
//!
//! Outgoing packets are routed to the peer owning the most specific prefix containing
//! the destination; decrypted incoming packets are accepted only if the most specific
//! prefix containing their source belongs to the peer that sent them. A prefix has at
//! most one owner: inserting it again moves it.
//!
//! This is an uncompressed binary trie, one per address family: at most 32 (IPv4) or
//! 128 (IPv6) steps a lookup, no allocation on lookup. Pure; checked against a naive
//! list model by a property test.

use std::net::IpAddr;

use ipnet::IpNet;

struct Node<T> {
    value: Option<T>,
    children: [Option<Box<Node<T>>>; 2],
}

impl<T> Node<T> {
    fn new() -> Self {
        Self {
            value: None,
            children: [None, None],
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.iter().all(Option::is_none)
    }
}

/// A longest-prefix-match table from prefixes to `T`.
pub struct AllowedIps<T> {
    v4: Node<T>,
    v6: Node<T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The address as a big-endian 128-bit integer (IPv4 in the top 32 bits) and its width.
fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => ((u128::from(u32::from(a))) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn bit(x: u128, i: u8) -> usize {
    ((x >> (127 - u32::from(i))) & 1) as usize
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            v4: Node::new(),
            v6: Node::new(),
        }
    }

    fn root(&self, addr: IpAddr) -> &Node<T> {
        match addr {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        }
    }

    fn root_mut(&mut self, addr: IpAddr) -> &mut Node<T> {
        match addr {
            IpAddr::V4(_) => &mut self.v4,
            IpAddr::V6(_) => &mut self.v6,
        }
    }

    /// Sets the owner of `net` (host bits are ignored), returning the previous owner.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let (x, _) = bits(net.network());
        let mut node = self.root_mut(net.network());
        for i in 0..net.prefix_len() {
            node = node.children[bit(x, i)].get_or_insert_with(|| Box::new(Node::new()));
        }
        node.value.replace(value)
    }

    /// Removes `net` exactly (not the prefixes inside it), returning its owner.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        fn go<T>(node: &mut Node<T>, x: u128, depth: u8, len: u8) -> Option<T> {
            if depth == len {
                return node.value.take();
            }
            let b = bit(x, depth);
            let child = node.children[b].as_mut()?;
            let out = go(child, x, depth + 1, len);
            if child.is_empty() {
                node.children[b] = None;
            }
            out
        }
        let (x, _) = bits(net.network());
        go(self.root_mut(net.network()), x, 0, net.prefix_len())
    }

    /// The owner of the most specific prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        let (x, width) = bits(addr);
        let mut node = self.root(addr);
        let mut best = node.value.as_ref();
        for i in 0..width {
            match &node.children[bit(x, i)] {
                Some(child) => node = child,
                None => break,
            }
            if node.value.is_some() {
                best = node.value.as_ref();
            }
        }
        best
    }

    /// Keeps only the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        fn go<T>(node: &mut Node<T>, keep: &mut impl FnMut(&T) -> bool) {
            if node.value.as_ref().is_some_and(|v| !keep(v)) {
                node.value = None;
            }
            for slot in &mut node.children {
                if let Some(child) = slot {
                    go(child, keep);
                    if child.is_empty() {
                        *slot = None;
                    }
                }
            }
        }
        go(&mut self.v4, &mut keep);
        go(&mut self.v6, &mut keep);
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 'a');
        t.insert(net("10.0.0.0/8"), 'b');
        t.insert(net("10.1.0.0/16"), 'c');
        t.insert(net("10.1.2.3/32"), 'd');
        t.insert(net("::/0"), 'e');
        t.insert(net("fd00::/8"), 'f');
        let cases = [
            ("1.2.3.4", Some('a')),
            ("10.2.0.1", Some('b')),
            ("10.1.9.9", Some('c')),
            ("10.1.2.3", Some('d')),
            ("2001:db8::1", Some('e')),
            ("fd12::1", Some('f')),
        ];
        for (addr, want) in cases {
            assert_eq!(t.lookup(ip(addr)).copied(), want, "{addr}");
        }
        assert_eq!(t.remove(net("10.1.0.0/16")), Some('c'));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&'b'));
        t.retain(|v| *v != 'a' && *v != 'e');
        assert_eq!(t.lookup(ip("1.2.3.4")), None);
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&'d'));
    }

    #[test]
    fn families_are_separate_and_host_bits_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.7/8"), 1);
        assert_eq!(t.lookup(ip("10.200.0.1")), Some(&1));
        assert_eq!(t.lookup(ip("::a00:1")), None);
        assert_eq!(t.lookup(ip("::ffff:10.0.0.1")), None);
        assert_eq!(t.insert(net("10.0.0.0/8"), 2), Some(1));
        assert_eq!(t.remove(net("10.0.0.0/9")), None);
    }

    /// The model: a list of (prefix, value); last insert of a prefix wins; lookup
    /// picks the longest containing prefix.
    #[derive(Default)]
    struct Model(Vec<(IpNet, u8)>);

    impl Model {
        fn insert(&mut self, n: IpNet, v: u8) {
            let n = n.trunc();
            self.0.retain(|(m, _)| *m != n);
            self.0.push((n, v));
        }
        fn remove(&mut self, n: IpNet) {
            let n = n.trunc();
            self.0.retain(|(m, _)| *m != n);
        }
        fn lookup(&self, a: IpAddr) -> Option<u8> {
            self.0
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| *v)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(IpNet, u8),
        Remove(IpNet),
        RetainNot(u8),
    }

    // Addresses from a small space so that prefixes overlap often.
    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..4, any::<u8>()).prop_map(|(hi, lo)| IpAddr::from([10, hi as u8, 0, lo])),
            (0u16..4, any::<u16>())
                .prop_map(|(hi, lo)| IpAddr::from([0xfd00, hi, 0, 0, 0, 0, 0, lo])),
        ]
    }

    fn prefix() -> impl Strategy<Value = IpNet> {
        (addr(), 0u8..=128).prop_map(|(a, len)| {
            let max = if a.is_ipv4() { 32 } else { 128 };
            IpNet::new(a, len % (max + 1)).expect("length bounded")
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (prefix(), 0u8..5).prop_map(|(n, v)| Op::Insert(n, v)),
            1 => prefix().prop_map(Op::Remove),
            1 => (0u8..5).prop_map(Op::RetainNot),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_naive_model(ops in prop::collection::vec(op(), 0..60),
                                   probes in prop::collection::vec(addr(), 1..40)) {
            let mut t = AllowedIps::new();
            let mut m = Model::default();
            for o in ops {
                match o {
                    Op::Insert(n, v) => { t.insert(n, v); m.insert(n, v); }
                    Op::Remove(n) => { t.remove(n); m.remove(n); }
                    Op::RetainNot(v) => { t.retain(|x| *x != v); m.0.retain(|(_, x)| *x != v); }
                }
            }
            for a in probes {
                prop_assert_eq!(t.lookup(a).copied(), m.lookup(a), "addr {}", a);
            }
        }
    }
}
