//! IP addresses: Cerbos's `inIPAddrRange` (Go `net` semantics) and cel-go's ext.Network
//! (`ip`, `cidr`, `isIP`, `isCIDR`, `ip.isCanonical`, the IP predicates and the CIDR methods,
//! Go `netip` semantics: strict parsing, no zones, no IPv4-mapped IPv6).

use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cel::common::functions::Function;
use cel::common::types::{CelInt, CelString, STRING_TYPE, Type};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::{DeclarationError, Env, ExecutionError};

use super::args::{Args, Ret, boolean, string, take};

pub(super) static IP_TYPE: Type = Type::new_unspecified_type("net.IP");
pub(super) static CIDR_TYPE: Type = Type::new_unspecified_type("net.CIDR");

/// An `ip` value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct IpVal(IpAddr);

/// A `cidr` value: an address (not necessarily masked) and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct CidrVal {
    addr: IpAddr,
    bits: u8,
}

impl std::fmt::Display for IpVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::fmt::Display for CidrVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

macro_rules! static_val {
    ($t:ty, $ty:expr) => {
        impl Val for $t {
            fn get_type(&self) -> &Type {
                &$ty
            }
            fn cel_type() -> &'static Type {
                &$ty
            }
            fn equals(&self, other: &dyn Val) -> bool {
                other.downcast_ref::<$t>().is_some_and(|o| o == self)
            }
            fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
                Box::new(*self)
            }
            fn as_any(&self) -> Option<&dyn Any> {
                Some(self)
            }
        }
        impl StaticVal for $t {}
    };
}

static_val!(IpVal, IP_TYPE);
static_val!(CidrVal, CIDR_TYPE);

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_type(IP_TYPE.to_owned())?;
    env.add_type(CIDR_TYPE.to_owned())?;
    let (ip, cidr_t) = (|| IP_TYPE.to_owned(), || CIDR_TYPE.to_owned());
    env.add_member_overload(
        "inIPAddrRange",
        "inIPAddrRange_string",
        STRING_TYPE,
        vec![STRING_TYPE],
        in_ip_addr_range,
    )?;
    env.add_overload("isIP", "is_ip", vec![STRING_TYPE], is_ip)?;
    env.add_overload("isCIDR", "is_cidr", vec![STRING_TYPE], is_cidr)?;
    env.add_overload("ip", "string_to_ip", vec![STRING_TYPE], to_ip)?;
    env.add_member_overload("ip", "cidr_ip", cidr_t(), vec![], cidr_ip)?;
    env.add_overload("cidr", "string_to_cidr", vec![STRING_TYPE], to_cidr)?;
    env.add_overload(
        "ip.isCanonical",
        "ip_is_canonical",
        vec![STRING_TYPE],
        is_canonical,
    )?;
    env.add_overload("string", "ip_to_string", vec![ip()], to_string)?;
    env.add_overload("string", "cidr_to_string", vec![cidr_t()], to_string)?;
    env.add_member_overload("family", "ip_family", ip(), vec![], family)?;
    let predicates: [(&str, Function); 5] = [
        ("isLoopback", is_loopback),
        ("isGlobalUnicast", global_unicast),
        ("isUnspecified", is_unspecified),
        ("isLinkLocalMulticast", link_local_multicast),
        ("isLinkLocalUnicast", link_local_unicast),
    ];
    for (name, f) in predicates {
        env.add_member_overload(name, &format!("ip_{name}"), ip(), vec![], f)?;
    }
    env.add_member_overload(
        "containsIP",
        "cidr_contains_ip",
        cidr_t(),
        vec![ip()],
        contains_ip,
    )?;
    env.add_member_overload(
        "containsIP",
        "cidr_contains_ip_string",
        cidr_t(),
        vec![STRING_TYPE],
        contains_ip,
    )?;
    env.add_member_overload(
        "containsCIDR",
        "cidr_contains_cidr",
        cidr_t(),
        vec![cidr_t()],
        contains_cidr,
    )?;
    env.add_member_overload(
        "containsCIDR",
        "cidr_contains_cidr_string",
        cidr_t(),
        vec![STRING_TYPE],
        contains_cidr,
    )?;
    env.add_member_overload("masked", "cidr_masked", cidr_t(), vec![], masked)?;
    env.add_member_overload(
        "prefixLength",
        "cidr_prefix_length",
        cidr_t(),
        vec![],
        prefix_length,
    )?;
    Ok(())
}

fn error(message: String) -> ExecutionError {
    ExecutionError::function_error("ip", message)
}

/// Go `netip.ParseAddr`, without zones or IPv4-mapped IPv6 (as cel-go's ext.Network).
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = s
        .parse()
        .map_err(|_| format!("IP Address {s:?} parse error during conversion from string"))?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!("IPv4-mapped IPv6 address {s:?} is not allowed"));
    }
    Ok(addr)
}

/// `addr/bits`, the prefix length in decimal without sign or leading zeros.
fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = s
        .split_once('/')
        .ok_or_else(|| format!("no '/' in CIDR {s:?}"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("bad address in CIDR {s:?}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let ok_digits = !bits.is_empty()
        && bits.bytes().all(|b| b.is_ascii_digit())
        && (bits == "0" || !bits.starts_with('0'));
    let bits: u8 = bits
        .parse()
        .ok()
        .filter(|b| ok_digits && *b <= max)
        .ok_or_else(|| format!("bad prefix length in CIDR {s:?}"))?;
    Ok((addr, bits))
}

fn parse_cidr(s: &str) -> Result<CidrVal, String> {
    let (addr, bits) = parse_prefix(s)
        .map_err(|e| format!("CIDR {s:?} parse error during conversion from string: {e}"))?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!("IPv4-mapped IPv6 address {s:?} is not allowed"));
    }
    Ok(CidrVal { addr, bits })
}

/// Go `net.ParseCIDR`, for `inIPAddrRange`.
pub(super) fn parse_net_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    parse_prefix(s).map_err(|_| format!("invalid CIDR address: {s}"))
}

/// The address as 128 bits, and its width (32 or 128).
fn bits_of(a: IpAddr) -> (u128, u32) {
    match a {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// Whether `a` and `b` (of the same family, `width` bits) agree on their first `n` bits.
fn same_prefix(a: u128, b: u128, width: u32, n: u32) -> bool {
    if n == 0 {
        return true;
    }
    let shift = width - n.min(width);
    (a >> shift) == (b >> shift)
}

fn contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    let ((n, nw), (i, iw)) = (bits_of(net), bits_of(ip));
    nw == iw && same_prefix(n, i, nw, u32::from(bits))
}

/// Cerbos `ip.inIPAddrRange(cidr)`: Go `net` semantics (an IPv4-mapped address is IPv4).
fn in_ip_addr_range<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [ip, cidr] = take(args)?;
    let ip_s = string(ip.as_ref(), "inIPAddrRange")?;
    let cidr_s = string(cidr.as_ref(), "inIPAddrRange")?;
    let ip: IpAddr = ip_s.parse().map_err(|_| {
        ExecutionError::function_error("inIPAddrRange", format!("invalid IP address: {ip_s}"))
    })?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (net, bits) =
        parse_net_cidr(cidr_s).map_err(|e| ExecutionError::function_error("inIPAddrRange", e))?;
    // An IPv4-mapped network is an IPv4 one, with the low 32 bits of its mask.
    let (net, bits) = match net {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), bits.saturating_sub(96)),
            None => (net, bits),
        },
        v4 => (v4, bits),
    };
    Ok(boolean(contains(net, bits, ip)))
}

fn is_ip<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    Ok(boolean(parse_ip(string(s.as_ref(), "isIP")?).is_ok()))
}

fn is_cidr<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    Ok(boolean(parse_cidr(string(s.as_ref(), "isCIDR")?).is_ok()))
}

fn to_ip<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    let ip = parse_ip(string(s.as_ref(), "ip")?).map_err(error)?;
    Ok(CowVal::owned(IpVal(ip)))
}

fn to_cidr<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    let cidr = parse_cidr(string(s.as_ref(), "cidr")?).map_err(error)?;
    Ok(CowVal::owned(cidr))
}

/// `ip.isCanonical(s)`: `s` is the RFC 5952 form of its address.
fn is_canonical<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [s] = take(args)?;
    let s = string(s.as_ref(), "ip.isCanonical")?;
    let ip = parse_ip(s).map_err(error)?;
    Ok(boolean(ip.to_string() == s))
}

fn to_string<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [x] = take(args)?;
    let s = if let Some(ip) = x.downcast_ref::<IpVal>() {
        ip.to_string()
    } else if let Some(c) = x.downcast_ref::<CidrVal>() {
        c.to_string()
    } else {
        return Err(error("expected an ip or a cidr".to_string()));
    };
    Ok(CowVal::owned(CelString::from(s)))
}

fn ip_of(v: &dyn Val) -> Result<IpAddr, ExecutionError> {
    v.downcast_ref::<IpVal>()
        .map(|ip| ip.0)
        .ok_or_else(|| error("expected an ip".to_string()))
}

fn cidr_of(v: &dyn Val) -> Result<CidrVal, ExecutionError> {
    v.downcast_ref::<CidrVal>()
        .copied()
        .ok_or_else(|| error("expected a cidr".to_string()))
}

fn family<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [ip] = take(args)?;
    let family = if ip_of(ip.as_ref())?.is_ipv4() { 4 } else { 6 };
    Ok(CowVal::owned(CelInt::from(family)))
}

macro_rules! ip_predicate {
    ($name:ident, $f:expr) => {
        fn $name<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
            let [ip] = take(args)?;
            let f: fn(IpAddr) -> bool = $f;
            Ok(boolean(f(ip_of(ip.as_ref())?)))
        }
    };
}

ip_predicate!(is_loopback, |a| a.is_loopback());
ip_predicate!(is_unspecified, |a| a.is_unspecified());
ip_predicate!(global_unicast, is_global_unicast);
ip_predicate!(link_local_multicast, is_link_local_multicast);
ip_predicate!(link_local_unicast, is_link_local_unicast);

/// Go `netip.Addr.IsGlobalUnicast`.
fn is_global_unicast(a: IpAddr) -> bool {
    if let IpAddr::V4(v4) = a
        && (v4 == Ipv4Addr::UNSPECIFIED || v4 == Ipv4Addr::BROADCAST)
    {
        return false;
    }
    a != IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        && !a.is_loopback()
        && !a.is_multicast()
        && !is_link_local_unicast(a)
}

fn is_link_local_unicast(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.octets()[..2] == [169, 254],
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn is_link_local_multicast(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        IpAddr::V6(v6) => v6.segments()[0] & 0xff0f == 0xff02,
    }
}

fn contains_ip<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [cidr, ip] = take(args)?;
    let cidr = cidr_of(cidr.as_ref())?;
    let ip = match ip.downcast_ref::<CelString>() {
        Some(s) => parse_ip(s.inner()).map_err(error)?,
        None => ip_of(ip.as_ref())?,
    };
    Ok(boolean(contains(cidr.addr, cidr.bits, ip)))
}

/// `parent.containsCIDR(child)`: the child lies within the parent.
fn contains_cidr<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [parent, child] = take(args)?;
    let parent = cidr_of(parent.as_ref())?;
    let child = match child.downcast_ref::<CelString>() {
        Some(s) => parse_cidr(s.inner()).map_err(error)?,
        None => cidr_of(child.as_ref())?,
    };
    Ok(boolean(
        parent.bits <= child.bits && contains(parent.addr, parent.bits, child.addr),
    ))
}

fn masked<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [cidr] = take(args)?;
    let c = cidr_of(cidr.as_ref())?;
    let (value, width) = bits_of(c.addr);
    let keep = u32::from(c.bits).min(width);
    let mask = if keep == 0 {
        0
    } else {
        (u128::MAX << (width - keep)) & (u128::MAX >> (128 - width))
    };
    let value = value & mask;
    let addr = match c.addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(0))),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    };
    Ok(CowVal::owned(CidrVal { addr, bits: c.bits }))
}

fn prefix_length<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [cidr] = take(args)?;
    Ok(CowVal::owned(CelInt::from(i64::from(
        cidr_of(cidr.as_ref())?.bits,
    ))))
}

fn cidr_ip<'b, 'v>(args: Args<'b, 'v>) -> Ret<'b, 'v> {
    let [cidr] = take(args)?;
    Ok(CowVal::owned(IpVal(cidr_of(cidr.as_ref())?.addr)))
}
