//! The PROXY protocol header (HAProxy's specification, versions 1 and 2) that an L4 balancer
//! sends before anything else, carrying the client's address. Sans-IO: give it what arrived;
//! it says how many bytes the header took, and the address, or that it needs more.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest version 2 header accepted (16 bytes, addresses and TLVs): TLVs beyond this are not
/// what a balancer in front of this proxy sends.
pub const V2_MAX: usize = 16 + 1024;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection is a client's, from this address.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// The balancer's own connection (v2 `LOCAL`, v1 `UNKNOWN`), or a family without addresses:
    /// the connection's own address stands.
    Local,
}

/// A parse that is done, or needs more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The header took the first `len` bytes.
    Done { header: Header, len: usize },
    /// More bytes are needed (at least this many in all, when known).
    Partial,
}

/// Why a connection's first bytes are not a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError(pub &'static str);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid PROXY protocol header: {}", self.0)
    }
}

impl std::error::Error for ProxyError {}

/// Reads a header from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let v1 = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() { Ok(Parsed::Partial) } else { parse_v2(buf) };
    }
    let n = buf.len().min(v1.len());
    if buf[..n] == v1[..n] {
        return if n < v1.len() { Ok(Parsed::Partial) } else { parse_v1(buf) };
    }
    Err(ProxyError("no PROXY protocol signature"))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(lf) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError("v1 header longer than 107 bytes"))
        } else {
            Ok(Parsed::Partial)
        };
    };
    if buf[lf - 1] != b'\r' {
        return Err(ProxyError("v1 header ends with a bare LF"));
    }
    let end = lf - 1;
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| ProxyError("v1 header is not ASCII"))?;
    let len = end + 2;
    let mut words = line.split(' ');
    let family = words.next().unwrap_or("");
    if family == "UNKNOWN" {
        // Whatever follows is to be ignored (the specification).
        return Ok(Parsed::Done { header: Header::Local, len });
    }
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else { return Err(ProxyError("v1 header needs four fields")) };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        match family {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| ProxyError("v1 address is not IPv4")),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| ProxyError("v1 address is not IPv6")),
            _ => Err(ProxyError("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        let canonical = s == "0" || !s.starts_with('0');
        s.parse::<u16>().ok().filter(|_| digits && canonical).ok_or(ProxyError("v1 port is not 0 to 65535"))
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Parsed::Done { header: Header::Proxied { source, destination }, len })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Partial);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0F);
    if version != 2 {
        return Err(ProxyError("v2 header with another version"));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0F);
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyError("v2 header longer than accepted"));
    }
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let addresses = &buf[16..len];
    match command {
        0 => return Ok(Parsed::Done { header: Header::Local, len }),
        1 => {}
        _ => return Err(ProxyError("v2 command is neither LOCAL nor PROXY")),
    }
    // Stream only: a datagram's addresses are not this TCP connection's.
    if transport != 1 && !(family == 0 && transport == 0) {
        return Err(ProxyError("v2 transport is not a stream"));
    }
    let header = match family {
        // AF_UNSPEC, AF_UNIX: no address this proxy can use; the connection's own stands.
        0 | 3 => Header::Local,
        1 => {
            let a = addresses.get(..12).ok_or(ProxyError("v2 IPv4 addresses cut short"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let a = addresses.get(..36).ok_or(ProxyError("v2 IPv6 addresses cut short"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => return Err(ProxyError("v2 address family is unknown")),
    };
    Ok(Parsed::Done { header, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Header, usize) {
        match parse(buf) {
            Ok(Parsed::Done { header, len }) => (header, len),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn proxied(s: &str, d: &str) -> Header {
        Header::Proxied { source: s.parse().expect("addr"), destination: d.parse().expect("addr") }
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET";
        assert_eq!(done(h), (proxied("192.0.2.7:56324", "10.0.0.1:443"), h.len() - 3));
        let h = b"PROXY TCP6 2001:db8::7 ::1 1 65535\r\n";
        assert_eq!(done(h), (proxied("[2001:db8::7]:1", "[::1]:65535"), h.len()));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (Header::Local, 15));
        assert_eq!(done(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").0, Header::Local);
        for partial in [&b"PRO"[..], b"PROXY TCP4 192.0.2.7", b""] {
            assert_eq!(parse(partial), Ok(Parsed::Partial), "{:?}", String::from_utf8_lossy(partial));
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n"[..],
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 080 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +80 2\r\n",
            b"PROXY TCP4  192.0.2.7 10.0.0.1 80 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 80 2 extra\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 80 2\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat()).is_err(), "too long");
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn version_2() {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA]); // a TLV, skipped
        let h = v2(1, 0x11, &body);
        assert_eq!(done(&h), (proxied("192.0.2.7:56324", "10.0.0.1:443"), h.len()));
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(done(&with_data).1, h.len());
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::Partial), "cut at {cut}");
        }
        let mut body6 = Vec::new();
        body6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().expect("v6").octets());
        body6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body6.extend_from_slice(&[0, 1, 1, 187]);
        assert_eq!(done(&v2(1, 0x21, &body6)).0, proxied("[2001:db8::7]:1", "[::1]:443"));
        assert_eq!(done(&v2(0, 0x00, &[])).0, Header::Local, "LOCAL (a health check)");
        assert_eq!(done(&v2(0, 0x11, &body)).0, Header::Local, "LOCAL ignores its addresses");
        assert_eq!(done(&v2(1, 0x00, &[])).0, Header::Local, "UNSPEC");
        assert_eq!(done(&v2(1, 0x31, &[0; 216])).0, Header::Local, "AF_UNIX");
        for bad in [
            v2(1, 0x12, &body),      // datagram
            v2(1, 0x11, &body[..8]), // addresses cut short
            v2(1, 0x21, &body),      // IPv6 cut short
            v2(2, 0x11, &body),      // unknown command
            v2(1, 0x41, &body),      // unknown family
            v2(1, 0x11, &[0; 1100]), // too long
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let mut v1_version = v2(1, 0x11, &body);
        v1_version[12] = 0x11;
        assert!(parse(&v1_version).is_err());
    }
}
