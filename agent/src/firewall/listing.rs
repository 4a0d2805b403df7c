//! `nft -s list table inet weir`, split in two: the shape (chains, rules,
//! sets' declarations) and the sets' elements. weir writes elements without
//! listing the table, so it knows them as addresses but not as nft prints
//! them; the shape is what an element write leaves alone. Comparing the two
//! parts apart lets a check tell weir's own table from drift after element
//! writes, instead of replacing it whole: a replacement resets the drop
//! counter, and the packets dropped while `nft` runs are not counted.

use std::collections::BTreeSet;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub shape: String,
    pub elements: BTreeSet<IpAddr>,
}

impl Listing {
    /// None when a set holds anything but bare addresses (an interval, a
    /// comment, a timeout): weir writes none of those, so it is drift.
    pub fn parse(text: &str) -> Option<Listing> {
        let mut shape = String::new();
        let mut elements = BTreeSet::new();
        // An element block being read: nft wraps a long list after a comma.
        let mut block: Option<String> = None;
        for line in text.lines() {
            let trimmed = line.trim();
            let read = match block.take() {
                Some(b) => b + trimmed,
                None => match trimmed.strip_prefix("elements = {") {
                    Some(rest) => rest.to_string(),
                    None => {
                        shape.push_str(line);
                        shape.push('\n');
                        continue;
                    }
                },
            };
            match read.strip_suffix('}') {
                Some(list) => {
                    for item in list.split(',') {
                        elements.insert(item.trim().parse().ok()?);
                    }
                }
                None => block = Some(read),
            }
        }
        block.is_none().then_some(Listing { shape, elements })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRAPPED: &str = "table inet weir {\n\tset peers4 {\n\t\ttype ipv4_addr\n\t\telements = { 198.18.0.1, \
                           198.18.0.2,\n\t\t\t     198.18.0.3 }\n\t}\n\n\tset peers6 {\n\t\ttype ipv6_addr\n\t\t\
                           elements = { fd00::1 }\n\t}\n}\n";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn elements_wrapped_over_lines_and_both_families_are_read() {
        let l = Listing::parse(WRAPPED).unwrap();
        assert_eq!(l.elements, [ip("198.18.0.1"), ip("198.18.0.2"), ip("198.18.0.3"), ip("fd00::1")].into());
        assert!(!l.shape.contains("elements") && !l.shape.contains("198.18"), "{}", l.shape);
        assert!(l.shape.contains("\tset peers4 {\n\t\ttype ipv4_addr\n\t}\n"), "{}", l.shape);
    }

    #[test]
    fn the_shape_does_not_depend_on_the_elements() {
        let empty = "table inet weir {\n\tset peers4 {\n\t\ttype ipv4_addr\n\t}\n\n\tset peers6 {\n\t\t\
                     type ipv6_addr\n\t}\n}\n";
        let (a, b) = (Listing::parse(WRAPPED).unwrap(), Listing::parse(empty).unwrap());
        assert_eq!(a.shape, b.shape);
        assert!(b.elements.is_empty());
    }

    #[test]
    fn an_element_that_is_not_a_bare_address_is_not_weirs() {
        let commented = "\tset peers4 {\n\t\ttype ipv4_addr\n\t\telements = { 198.18.0.5 comment \"x\" }\n\t}\n";
        assert_eq!(Listing::parse(commented), None);
        let unclosed = "\tset peers4 {\n\t\ttype ipv4_addr\n\t\telements = { 198.18.0.5,\n";
        assert_eq!(Listing::parse(unclosed), None);
    }
}
