//! Outbound safety: every connection the coordinator makes on a user's behalf (repositories,
//! provider APIs, notification webhooks) goes only to public addresses, unless the admin allows
//! a host or range in `[outbound]`. URLs are checked when they are saved (`check_url`) and again
//! when a connection is made (`http_client`'s resolver, peer check and redirect policy), so a
//! name that later resolves to an internal address (DNS rebinding) is still refused.
//! Classifying an address is pure (`classify`, `parse_ipv4_like_libc`); only `check_url` and
//! the client's resolver do IO, and nothing here ever trusts a lenient URL parser alone.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::api_error::ApiError;
use crate::state::records::NotificationType;

/// How long a connect-time check waits for a name to resolve. A name that does not resolve in
/// time is accepted there: the connection-time resolver checks it again before any byte is sent.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Redirects followed by `http_client`, each one checked like the first URL.
pub const MAX_REDIRECTS: usize = 5;

/// The `[outbound]` section of the node configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundSettings {
    /// Allow loopback, private (RFC 1918, CGNAT, IPv6 unique local), link-local, unspecified and
    /// the other non-public (multicast, documentation...) addresses. `davit up` sets it: on a
    /// developer's own machine those are the user's own.
    pub allow_private_networks: bool,
    /// Host names always allowed, whatever they resolve to (exact names, case-insensitive):
    /// a self-hosted forge on a private network, for example.
    pub allow_hosts: Vec<String>,
    /// Address ranges (CIDR, such as `10.20.0.0/16` or `fd00::/8`; a bare address is one host)
    /// always allowed.
    pub allow_ranges: Vec<String>,
    /// Allow `file://` repository URLs (repositories on the coordinator's own disk).
    pub allow_file_urls: bool,
}

/// What kind of address an IP is, for deciding whether an outbound connection may go there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Public,
    Loopback,
    /// RFC 1918 ranges, IPv6 unique local (fc00::/7) and site-local (fec0::/10), local-use NAT64.
    Private,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedAddressSpace,
    /// 169.254.0.0/16 (cloud metadata services live here) and fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8 and `::`: Linux connects them to the local host.
    Unspecified,
    /// Multicast, broadcast, documentation, benchmarking and other special-purpose ranges:
    /// never a forge or a webhook receiver.
    Reserved(&'static str),
}

impl AddressClass {
    /// The words used in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private-network",
            AddressClass::SharedAddressSpace => "carrier-grade NAT (shared address space)",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Unspecified => "unspecified (this host)",
            AddressClass::Reserved(what) => what,
        }
    }

    /// Whether `allow_private_networks` covers this class: every class but public. The
    /// special-purpose ranges are included so that a developer's machine, where the setting is
    /// meant, never refuses an address `davit serve` would only refuse for being internal.
    fn is_private_network(self) -> bool {
        self != AddressClass::Public
    }
}

/// Classify an IPv4 address (RFC 6890 special-purpose registry, the ranges that matter here).
pub fn classify_ipv4(address: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = address.octets();
    match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        (100, 64..=127, _) => AddressClass::SharedAddressSpace,
        (169, 254, _) => AddressClass::LinkLocal,
        (192, 0, 0) => AddressClass::Reserved("IETF protocol assignment"),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Reserved("documentation"),
        (192, 88, 99) => AddressClass::Reserved("6to4 relay anycast"),
        (198, 18..=19, _) => AddressClass::Reserved("benchmarking"),
        (224..=239, _, _) => AddressClass::Reserved("multicast"),
        (240..=255, _, _) => AddressClass::Reserved("reserved or broadcast"),
        _ => AddressClass::Public,
    }
}

/// The IPv4 address an IPv6 address carries, for the forms that reach it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some stacks),
/// IPv4-translated (`::ffff:0:a.b.c.d`), NAT64's well-known prefix (`64:ff9b::/96`) and 6to4
/// (`2002:AABB:CCDD::/48`). Returns the form's name with it.
pub fn embedded_ipv4(address: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    let segments = address.segments();
    let octets = address.octets();
    let low = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
    match segments {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((low, "IPv4-mapped")),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some((low, "IPv4-translated")),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses, not embeddings.
        [0, 0, 0, 0, 0, 0, high, rest] if high != 0 || rest > 1 => Some((low, "IPv4-compatible")),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((low, "NAT64")),
        [0x2002, _, _, ..] => Some((Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]), "6to4")),
        _ => None,
    }
}

/// Classify an IP address; an IPv6 address that carries an IPv4 one is classified by it.
pub fn classify(address: IpAddr) -> AddressClass {
    let address = match address {
        IpAddr::V4(address) => return classify_ipv4(address),
        IpAddr::V6(address) => address,
    };
    if let Some((embedded, _)) = embedded_ipv4(address) {
        return classify_ipv4(embedded);
    }
    let segments = address.segments();
    if address.is_unspecified() {
        AddressClass::Unspecified
    } else if address.is_loopback() {
        AddressClass::Loopback
    } else if segments[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if segments[0] & 0xfe00 == 0xfc00 || segments[0] & 0xffc0 == 0xfec0 || (segments[0] == 0x64 && segments[1] == 0xff9b) {
        // Unique local, deprecated site-local, and local-use NAT64 (64:ff9b:1::/48), whose
        // translation only the local network knows.
        AddressClass::Private
    } else if segments[0] & 0xff00 == 0xff00 {
        AddressClass::Reserved("multicast")
    } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
        AddressClass::Reserved("documentation")
    } else if segments[0] == 0x2001 && segments[1] < 0x0200 {
        AddressClass::Reserved("IETF special-purpose (Teredo, ORCHID and others)")
    } else if segments[0] & 0xe000 != 0x2000 {
        // Only 2000::/3 is allocated as global unicast.
        AddressClass::Reserved("not global unicast")
    } else {
        AddressClass::Public
    }
}

/// Parse a host the way glibc's `inet_aton` (and so `getaddrinfo`, `ssh` and `git`) reads an
/// IPv4 address: one to four parts separated by dots, each decimal, octal (leading `0`) or hex
/// (`0x`); the last part fills the remaining bytes. `2130706433`, `0x7f.1`, `0177.0.0.1` and
/// `127.1` are all 127.0.0.1. One trailing dot is ignored, as URL parsers ignore it.
pub fn parse_ipv4_like_libc(host: &str) -> Option<Ipv4Addr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        // `0x` alone is zero to inet_aton; an empty part otherwise is not a number.
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let mut value: u64 = 0;
        for character in digits.chars() {
            let digit = character.to_digit(radix)?;
            value = value * u64::from(radix) + u64::from(digit);
            if value > u64::from(u32::MAX) {
                return None;
            }
        }
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&value| value > 255) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if last_bits < 32 && *last >= 1u64 << last_bits {
        return None;
    }
    let mut address: u32 = 0;
    for (index, value) in leading.iter().enumerate() {
        address |= (*value as u32) << (24 - 8 * index as u32);
    }
    Some(Ipv4Addr::from(address | *last as u32))
}

/// An allowed address range from `allow_ranges`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    network: IpAddr,
    prefix_length: u8,
}

impl AddressRange {
    /// Parse `10.0.0.0/8`, `fd00::/8` or a bare address; host bits must be zero so that a typo
    /// (`10.0.0.1/8`) is caught instead of silently widening or narrowing the range.
    pub fn parse(text: &str) -> Result<AddressRange, String> {
        let (address_text, prefix_text) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address_text.trim().parse().map_err(|_| format!("{address_text:?} is not an IPv4 or IPv6 address"))?;
        let max_length = if network.is_ipv4() { 32 } else { 128 };
        let prefix_length = match prefix_text {
            None => max_length,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|length| *length <= max_length)
                .ok_or_else(|| format!("prefix length {prefix:?} must be a number from 0 to {max_length}"))?,
        };
        let range = AddressRange { network, prefix_length };
        if range.masked(network) != network {
            let suggestion = AddressRange { network: range.masked(network), prefix_length };
            return Err(format!("{text:?} has bits set after the prefix; did you mean \"{suggestion}\"?"));
        }
        Ok(range)
    }

    fn masked(&self, address: IpAddr) -> IpAddr {
        match address {
            IpAddr::V4(address) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_length)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(address) & mask))
            }
            IpAddr::V6(address) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_length)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask))
            }
        }
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        address.is_ipv4() == self.network.is_ipv4() && self.masked(address) == self.network
    }
}

impl std::fmt::Display for AddressRange {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.network, self.prefix_length)
    }
}

/// Why an outbound URL or connection is refused. The API answers 400 with the message; the
/// client's errors carry it in their source chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("{field} {url:?} is not a URL Davit can use: {problem}")]
    Malformed { field: String, url: String, problem: String },
    #[error("{field} {url:?} uses {scheme}://, but only {allowed} are allowed here")]
    UnsupportedScheme { field: String, url: String, scheme: String, allowed: &'static str },
    #[error(
        "{field} {url:?} is a file:// URL, which reads the coordinator's own disk; an admin can allow it with `[outbound] allow_file_urls = true` in the node configuration"
    )]
    FileUrlsNotAllowed { field: String, url: String },
    #[error(
        "{field} refused: host {host:?} {how} {address}, a {class} address, and the coordinator does not connect to internal addresses; \
         if this is your own server, an admin can allow it in the node configuration with `[outbound] allow_hosts = [\"{host}\"]` \
         or `allow_ranges = [\"{range}\"]`"
    )]
    InternalAddress { field: String, host: String, how: &'static str, address: IpAddr, class: &'static str, range: String },
}

impl OutboundError {
    /// A stable error code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            OutboundError::Malformed { .. } | OutboundError::UnsupportedScheme { .. } => "invalid_field",
            OutboundError::FileUrlsNotAllowed { .. } | OutboundError::InternalAddress { .. } => "outbound_refused",
        }
    }

    fn field(&self) -> &str {
        match self {
            OutboundError::Malformed { field, .. }
            | OutboundError::UnsupportedScheme { field, .. }
            | OutboundError::FileUrlsNotAllowed { field, .. }
            | OutboundError::InternalAddress { field, .. } => field,
        }
    }
}

impl From<OutboundError> for ApiError {
    fn from(error: OutboundError) -> Self {
        ApiError { field: Some(error.field().to_string()), ..ApiError::new(StatusCode::BAD_REQUEST, error.code(), error.to_string()) }
    }
}

/// The URL schemes a check accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    /// A repository: `https`, `http`, `ssh`, `git`, `file` or scp-like `user@host:path`.
    Repository,
    /// An HTTP API or webhook receiver: `https` or `http`.
    Http,
}

/// What a host text means to the programs that will connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMeaning {
    /// An address literal in one of its spellings. Several when parsers disagree (all checked).
    Addresses(Vec<IpAddr>),
    /// A name to resolve, lower-cased, without a trailing dot.
    Name(String),
}

/// Read a host the way every consumer might: glibc's `inet_aton` forms (ssh, git, curl), the
/// WHATWG URL parser's (reqwest: percent-decoding, IDNA mapping such as full-width digits,
/// its own IPv4 forms), and bracketed IPv6 with or without a zone. An address found by any of
/// them is what the host means; otherwise it is a name.
fn host_meaning(host: &str) -> HostMeaning {
    let mut host = host;
    if host.starts_with('[') {
        // A zone (`fe80::1%eth0`, `%25` in URLs) only scopes a link-local address. Brackets
        // doubled or left open are read as far as they go (no recursion: the text may be long).
        let inner = host.trim_start_matches('[');
        let inner = inner.split(']').next().unwrap_or(inner);
        let without_zone = inner.split('%').next().unwrap_or(inner);
        if let Ok(address) = without_zone.parse::<Ipv6Addr>() {
            return HostMeaning::Addresses(vec![IpAddr::V6(address)]);
        }
        host = without_zone;
    }
    let lower = host.to_lowercase();
    let mut addresses = BTreeSet::new();
    if let Ok(address) = lower.parse::<IpAddr>() {
        addresses.insert(address);
    }
    if let Some(address) = parse_ipv4_like_libc(&lower) {
        addresses.insert(IpAddr::V4(address));
    }
    let mut name = lower.strip_suffix('.').unwrap_or(&lower).to_string();
    match url::Host::parse(&lower) {
        Ok(url::Host::Ipv4(address)) => {
            addresses.insert(IpAddr::V4(address));
        }
        Ok(url::Host::Ipv6(address)) => {
            addresses.insert(IpAddr::V6(address));
        }
        Ok(url::Host::Domain(domain)) => {
            if let Some(address) = parse_ipv4_like_libc(&domain) {
                addresses.insert(IpAddr::V4(address));
            }
            name = domain.strip_suffix('.').unwrap_or(&domain).to_string();
        }
        // Not a host a URL parser accepts: reqwest cannot connect to it, and what the system
        // resolver makes of it is checked by resolving it.
        Err(_) => {}
    }
    if addresses.is_empty() { HostMeaning::Name(name) } else { HostMeaning::Addresses(addresses.into_iter().collect()) }
}

/// Whether a name means this host whatever DNS says (RFC 6761 reserves `localhost`).
fn is_loopback_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost") || name == "localhost.localdomain"
}

/// The host of a URL, every way it can be read (no hosts for `file://`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlTarget {
    scheme: String,
    /// Hosts to check: normally one; two when userinfo makes the host ambiguous
    /// (`http://a@b@c/`: parsers disagree on which `@` ends the userinfo).
    hosts: Vec<String>,
    port: Option<u16>,
}

/// Split a URL into scheme and host(s) with no leniency that could hide a host: the authority
/// ends at the first `/`, `?`, `#` or (for http, as browsers read it) `\`.
fn url_target(url: &str) -> Result<UrlTarget, String> {
    if url.chars().any(|character| character.is_whitespace() || character.is_control()) {
        return Err("it contains whitespace or control characters".into());
    }
    let (scheme, authority) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            let end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
            (scheme, &rest[..end])
        }
        None => {
            // scp-like `user@host:path`, the form git and ssh accept without a scheme. The host
            // ends at the first colon, or after `]` for a bracketed IPv6 address.
            let authority_end = match url.find('[') {
                Some(open) if !url[..open].contains(':') => url[open..].find("]:").map(|close| open + close + 1).or_else(|| url.find(':')),
                _ => url.find(':'),
            };
            let authority_end = authority_end.ok_or("it is neither scheme://host/path nor user@host:path")?;
            ("scp".to_string(), &url[..authority_end])
        }
    };
    if scheme == "file" {
        return Ok(UrlTarget { scheme, hosts: Vec::new(), port: None });
    }
    if authority.is_empty() {
        return Err("it has no host".into());
    }
    let after_last_at = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let after_first_at = authority.split_once('@').map_or(authority, |(_, host)| host);
    let mut hosts = Vec::new();
    let mut port = None;
    for host_and_port in [after_last_at, after_first_at] {
        let (host, port_text) = split_port(host_and_port);
        if port.is_none() {
            port = port_text.and_then(|text| text.parse::<u16>().ok());
        }
        if !hosts.iter().any(|known: &String| known == host) {
            hosts.push(host.to_string());
        }
    }
    Ok(UrlTarget { scheme, hosts, port })
}

/// `host:port` → (`host`, `port`), minding brackets around IPv6 addresses.
fn split_port(host_and_port: &str) -> (&str, Option<&str>) {
    if host_and_port.starts_with('[') {
        return match host_and_port.split_once("]:") {
            Some((host, port)) => (&host_and_port[..host.len() + 1], Some(port)),
            None => (host_and_port, None),
        };
    }
    match host_and_port.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_and_port, None),
    }
}

/// The outbound rules of one node, from its `[outbound]` configuration.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    allow_private_networks: bool,
    allow_file_urls: bool,
    allowed_hosts: BTreeSet<String>,
    allowed_ranges: Vec<AddressRange>,
}

impl OutboundPolicy {
    /// The policy of a configuration, or what is wrong with it (named so the admin can fix it).
    pub fn new(settings: &OutboundSettings) -> Result<OutboundPolicy, String> {
        let mut allowed_hosts = BTreeSet::new();
        for host in &settings.allow_hosts {
            let name = host.trim().trim_end_matches('.').to_lowercase();
            if name.is_empty() || name.contains(['/', ':', '@', ' ']) {
                return Err(format!("[outbound] allow_hosts entry {host:?} must be a plain host name such as \"git.internal.example\""));
            }
            if name.parse::<IpAddr>().is_ok() || parse_ipv4_like_libc(&name).is_some() {
                return Err(format!(
                    "[outbound] allow_hosts entry {host:?} is an address; list addresses in allow_ranges, e.g. [\"{name}/32\"]"
                ));
            }
            allowed_hosts.insert(name);
        }
        let allowed_ranges = settings
            .allow_ranges
            .iter()
            .map(|range| AddressRange::parse(range).map_err(|problem| format!("[outbound] allow_ranges entry {problem}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OutboundPolicy {
            allow_private_networks: settings.allow_private_networks,
            allow_file_urls: settings.allow_file_urls,
            allowed_hosts,
            allowed_ranges,
        })
    }

    /// `davit serve`'s default: public addresses only.
    pub fn public_only() -> OutboundPolicy {
        OutboundPolicy::new(&OutboundSettings::default()).expect("the default settings are valid")
    }

    /// Whether connections may go to `address`: a public address, one in `allow_ranges`, or an
    /// internal one that `allow_private_networks` covers. Returns the class refused otherwise.
    /// An IPv6 address carrying an IPv4 one is allowed by a range holding either.
    pub fn check_address(&self, address: IpAddr) -> Result<(), AddressClass> {
        let embedded = match address {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(|(v4, _)| IpAddr::V4(v4)),
            IpAddr::V4(_) => None,
        };
        if self.allowed_ranges.iter().any(|range| range.contains(address) || embedded.is_some_and(|v4| range.contains(v4))) {
            return Ok(());
        }
        match classify(address) {
            AddressClass::Public => Ok(()),
            class if class.is_private_network() && self.allow_private_networks => Ok(()),
            class => Err(class),
        }
    }

    /// Whether the admin listed this host name in `allow_hosts`.
    pub fn is_allowed_host(&self, host: &str) -> bool {
        let name = host.trim_end_matches('.').to_lowercase();
        self.allowed_hosts.contains(&name)
    }

    /// The value for git's `GIT_ALLOW_PROTOCOL` when the coordinator runs git itself (polling
    /// with `git ls-remote`): https, ssh and git, plus file when `allow_file_urls` is set. git
    /// then refuses other transports (ext::, fd::, http:// without TLS), also in submodules.
    pub fn git_allowed_protocols(&self) -> &'static str {
        crate::scm::polling::git_allowed_protocols(self.allow_file_urls)
    }

    /// For the coordinator's own git (polling with `git ls-remote`): check a repository URL at
    /// the moment of use and return the `-c` arguments that pin an http(s) host to the
    /// addresses just checked (curl's resolve list, git 2.37+), so a DNS answer that changes
    /// between the check and git's own lookup cannot send git elsewhere. ssh:// and git://
    /// resolve inside ssh and git, so for them (and for address literals, allowed hosts and
    /// names that do not resolve) this only checks. Run git with these arguments first and
    /// `GIT_ALLOW_PROTOCOL=git_allowed_protocols()` in its environment.
    pub async fn git_arguments_for(&self, field: &str, url: &str) -> Result<Vec<String>, OutboundError> {
        self.check_url(field, url, UrlKind::Repository).await?;
        let Ok(target) = url_target(url) else { return Ok(Vec::new()) };
        let port = match (target.scheme.as_str(), target.port) {
            (_, Some(port)) => port,
            ("https", None) => 443,
            ("http", None) => 80,
            _ => return Ok(Vec::new()),
        };
        let mut arguments = Vec::new();
        for host in &target.hosts {
            let HostMeaning::Name(name) = host_meaning(host) else { continue };
            if name.is_empty() || self.is_allowed_host(&name) {
                continue;
            }
            let addresses = resolve(&name, port).await;
            if addresses.is_empty() {
                continue;
            }
            for address in &addresses {
                self.check_address(*address).map_err(|class| self.refusal(field, host, "resolves to", *address, class))?;
            }
            let pinned: Vec<String> = addresses
                .iter()
                .map(|address| match address {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                })
                .collect();
            arguments.push("-c".to_string());
            arguments.push(format!("http.curloptResolve={name}:{port}:{}", pinned.join(",")));
        }
        Ok(arguments)
    }

    /// The startup line that says what `[outbound]` allows beyond public addresses.
    pub fn describe(&self) -> String {
        let mut allowed = Vec::new();
        if self.allow_private_networks {
            allowed.push("loopback, private and link-local addresses".to_string());
        }
        if self.allow_file_urls {
            allowed.push("file:// repository URLs".to_string());
        }
        if !self.allowed_hosts.is_empty() {
            allowed.push(format!("hosts {}", self.allowed_hosts.iter().cloned().collect::<Vec<_>>().join(", ")));
        }
        if !self.allowed_ranges.is_empty() {
            allowed.push(format!("ranges {}", self.allowed_ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")));
        }
        if allowed.is_empty() { "public addresses only".into() } else { format!("public addresses and {}", allowed.join(", ")) }
    }

    fn refusal(&self, field: &str, host: &str, how: &'static str, address: IpAddr, class: AddressClass) -> OutboundError {
        let range = match address {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some((v4, _)) => format!("{v4}/32"),
                None => format!("{v6}/128"),
            },
        };
        OutboundError::InternalAddress { field: field.to_string(), host: host.to_string(), how, address, class: class.describe(), range }
    }

    /// Check a URL when it is saved: its scheme, every reading of its host, and (for a name)
    /// every address it resolves to now. `field` names the request field in the error.
    pub async fn check_url(&self, field: &str, url: &str, kind: UrlKind) -> Result<(), OutboundError> {
        let malformed = |problem: String| OutboundError::Malformed { field: field.to_string(), url: url.to_string(), problem };
        let target = url_target(url).map_err(malformed)?;
        let allowed: &'static str = match kind {
            UrlKind::Repository => "https, http, ssh, git, file and user@host:path",
            UrlKind::Http => "https and http",
        };
        let scheme_allowed = match kind {
            UrlKind::Repository => ["https", "http", "ssh", "git", "file", "scp"].contains(&target.scheme.as_str()),
            UrlKind::Http => ["https", "http"].contains(&target.scheme.as_str()),
        };
        if !scheme_allowed {
            return Err(OutboundError::UnsupportedScheme { field: field.into(), url: url.into(), scheme: target.scheme, allowed });
        }
        if target.scheme == "file" {
            return if self.allow_file_urls {
                Ok(())
            } else {
                Err(OutboundError::FileUrlsNotAllowed { field: field.to_string(), url: url.to_string() })
            };
        }
        let default_port = match target.scheme.as_str() {
            "https" => 443,
            "http" => 80,
            "git" => 9418,
            _ => 22,
        };
        for host in &target.hosts {
            match host_meaning(host) {
                HostMeaning::Addresses(addresses) => {
                    for address in addresses {
                        self.check_address(address).map_err(|class| self.refusal(field, host, "is the address", address, class))?;
                    }
                }
                // No host after the userinfo: nothing can be connected to, so nothing to refuse.
                HostMeaning::Name(name) if name.is_empty() || self.is_allowed_host(&name) => {}
                HostMeaning::Name(name) => {
                    let addresses = resolve(&name, target.port.unwrap_or(default_port)).await;
                    if addresses.is_empty() && is_loopback_name(&name) {
                        let address = IpAddr::V4(Ipv4Addr::LOCALHOST);
                        self.check_address(address).map_err(|class| self.refusal(field, host, "always means", address, class))?;
                    }
                    for address in addresses {
                        self.check_address(address).map_err(|class| self.refusal(field, host, "resolves to", address, class))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Check a notification's target when it is created: webhook-style targets (Slack) are
    /// URLs checked like any outbound URL; e-mail addresses go through the mail relay and
    /// need no check here.
    pub async fn check_notification_target(&self, notification_type: NotificationType, target: &str) -> Result<(), OutboundError> {
        match notification_type {
            NotificationType::Email => Ok(()),
            NotificationType::Slack => self.check_url("target", target, UrlKind::Http).await,
        }
    }

    /// An HTTP client for provider APIs and notification webhooks that enforces this policy
    /// when it connects: its resolver refuses names with any internal address (so a name that
    /// passed `check_url` and was re-pointed since is still refused), the address it actually
    /// connected to is checked before a byte of the request is sent (this catches address
    /// literals, which skip the resolver), every redirect is checked, at most `MAX_REDIRECTS`
    /// are followed, and system proxies are ignored (through a proxy, the proxy would resolve).
    pub fn http_client(self: &Arc<Self>) -> reqwest::Result<reqwest::Client> {
        self.http_client_builder().build()
    }

    /// `http_client`'s builder, for callers that add timeouts or headers. Do not add a proxy,
    /// a resolver or a redirect policy to it: they would bypass the checks.
    pub fn http_client_builder(self: &Arc<Self>) -> reqwest::ClientBuilder {
        let approved = Arc::new(Mutex::new(BTreeSet::new()));
        let resolver = PolicyResolver { policy: self.clone(), approved_addresses: approved.clone() };
        let guard = PeerCheckLayer { policy: self.clone(), approved_addresses: approved };
        let policy = self.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("refused to follow more than {MAX_REDIRECTS} redirects"));
            }
            match policy.check_redirect(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(error) => attempt.error(error),
            }
        });
        reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(resolver))
            .connector_layer(guard)
            .redirect(redirects)
            .connect_timeout(Duration::from_secs(10))
    }

    /// Check a redirect's target before following it. Names are checked by the resolver when
    /// the connection is made; address literals and loopback names here.
    fn check_redirect(&self, url: &reqwest::Url) -> Result<(), OutboundError> {
        let field = "redirect";
        if !["https", "http"].contains(&url.scheme()) {
            return Err(OutboundError::UnsupportedScheme {
                field: field.into(),
                url: url.to_string(),
                scheme: url.scheme().to_string(),
                allowed: "https and http",
            });
        }
        let (host, address) = match url.host() {
            Some(url::Host::Ipv4(address)) => (address.to_string(), IpAddr::V4(address)),
            Some(url::Host::Ipv6(address)) => (address.to_string(), IpAddr::V6(address)),
            Some(url::Host::Domain(name)) if is_loopback_name(name) && !self.is_allowed_host(name) => {
                (name.to_string(), IpAddr::V4(Ipv4Addr::LOCALHOST))
            }
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err(OutboundError::Malformed { field: field.into(), url: url.to_string(), problem: "it has no host".into() }),
        };
        self.check_address(address).map_err(|class| self.refusal(field, &host, "is the address", address, class))
    }
}

/// Resolve a name with the system resolver, waiting at most `RESOLVE_TIMEOUT`. Nothing when it
/// does not resolve (in time): the caller decides what that means.
async fn resolve(name: &str, port: u16) -> Vec<IpAddr> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(addresses)) => addresses.map(|address| address.ip()).collect(),
        Ok(Err(error)) => {
            tracing::debug!(%name, %error, "outbound check: name does not resolve");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!(%name, "outbound check: name did not resolve in time");
            Vec::new()
        }
    }
}

/// The addresses the resolver handed out for names in `allow_hosts`: the peer check lets
/// connections to them through, since the admin allowed the name, not the address.
type ApprovedAddresses = Arc<Mutex<BTreeSet<IpAddr>>>;

/// `http_client`'s resolver: the system's, refusing a name when any address it has is internal
/// (a name that mixes public and internal addresses is a rebinding trick, not a forge).
struct PolicyResolver {
    policy: Arc<OutboundPolicy>,
    approved_addresses: ApprovedAddresses,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let approved_addresses = self.approved_addresses.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
                .await
                .map_err(|_| format!("resolving {name} took longer than {} s", RESOLVE_TIMEOUT.as_secs()))??
                .collect();
            if policy.is_allowed_host(&name) {
                approved_addresses.lock().expect("approved addresses lock").extend(addresses.iter().map(SocketAddr::ip));
            } else {
                for address in &addresses {
                    if let Err(class) = policy.check_address(address.ip()) {
                        return Err(policy.refusal("connection", &name, "resolves to", address.ip(), class).into());
                    }
                }
            }
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// A connector layer that checks the address each new connection actually reached, before
/// hyper writes the request on it.
#[derive(Clone)]
struct PeerCheckLayer {
    policy: Arc<OutboundPolicy>,
    approved_addresses: ApprovedAddresses,
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck { inner, policy: self.policy.clone(), approved_addresses: self.approved_addresses.clone() }
    }
}

#[derive(Clone)]
struct PeerCheck<S> {
    inner: S,
    policy: Arc<OutboundPolicy>,
    approved_addresses: ApprovedAddresses,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, Request> tower::Service<Request> for PeerCheck<S>
where
    S: tower::Service<Request, Error = BoxError>,
    S::Response: hyper_util::client::legacy::connect::Connection,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let connecting = self.inner.call(request);
        let policy = self.policy.clone();
        let approved_addresses = self.approved_addresses.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            let mut extensions = axum::http::Extensions::new();
            hyper_util::client::legacy::connect::Connection::connected(&connection).get_extras(&mut extensions);
            let Some(info) = extensions.get::<hyper_util::client::legacy::connect::HttpInfo>() else {
                return Err("refused: cannot tell which address the connection reached".into());
            };
            let address = info.remote_addr().ip();
            if approved_addresses.lock().expect("approved addresses lock").contains(&address) {
                return Ok(connection);
            }
            match policy.check_address(address) {
                Ok(()) => Ok(connection),
                Err(class) => Err(policy.refusal("connection", &address.to_string(), "is the address", address, class).into()),
            }
        })
    }
}

#[cfg(test)]
mod tests;
