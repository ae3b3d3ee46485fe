use super::*;

fn policy(settings: OutboundSettings) -> Arc<OutboundPolicy> {
    Arc::new(OutboundPolicy::new(&settings).expect("valid settings"))
}

fn allowing_ranges(ranges: &[&str]) -> Arc<OutboundPolicy> {
    policy(OutboundSettings { allow_ranges: ranges.iter().map(|range| range.to_string()).collect(), ..Default::default() })
}

#[test]
fn inet_aton_forms_are_read_as_libc_reads_them() {
    let loopback = Some(Ipv4Addr::LOCALHOST);
    for form in
        ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.1", "127.0.1", "0x7F.0.0.1", "017700000001", "127.0.0.1."]
    {
        assert_eq!(parse_ipv4_like_libc(form), loopback, "{form}");
    }
    assert_eq!(parse_ipv4_like_libc("169.254.43518"), Some(Ipv4Addr::new(169, 254, 169, 254)));
    assert_eq!(parse_ipv4_like_libc("0"), Some(Ipv4Addr::UNSPECIFIED));
    assert_eq!(parse_ipv4_like_libc("0x"), Some(Ipv4Addr::UNSPECIFIED));
    assert_eq!(parse_ipv4_like_libc("10.0x10.0300.1"), Some(Ipv4Addr::new(10, 16, 192, 1)));
    for not_an_address in
        ["github.com", "1.2.3.4.5", "256.1.1.1", "1.2.3.256", "4294967296", "08.1.1.1", "0x1g", "", ".", "1..2", "127.0.0.1.."]
    {
        assert_eq!(parse_ipv4_like_libc(not_an_address), None, "{not_an_address}");
    }
    // The last part fills the bytes left: 127.65535 is 127.0.255.255, 127.65536 does not fit.
    assert_eq!(parse_ipv4_like_libc("127.65535"), Some(Ipv4Addr::new(127, 0, 255, 255)));
    assert_eq!(parse_ipv4_like_libc("127.16777216"), None);
}

#[test]
fn addresses_are_classified() {
    let class = |text: &str| classify(text.parse().unwrap());
    for (address, expected) in [
        ("127.0.0.1", AddressClass::Loopback),
        ("127.255.255.254", AddressClass::Loopback),
        ("10.1.2.3", AddressClass::Private),
        ("172.16.0.1", AddressClass::Private),
        ("172.31.255.255", AddressClass::Private),
        ("192.168.1.1", AddressClass::Private),
        ("100.64.0.1", AddressClass::SharedAddressSpace),
        ("100.127.255.255", AddressClass::SharedAddressSpace),
        ("169.254.169.254", AddressClass::LinkLocal),
        ("0.0.0.0", AddressClass::Unspecified),
        ("::", AddressClass::Unspecified),
        ("::1", AddressClass::Loopback),
        ("fe80::1", AddressClass::LinkLocal),
        ("febf::1", AddressClass::LinkLocal),
        ("fc00::1", AddressClass::Private),
        ("fd12:3456::1", AddressClass::Private),
        ("fec0::1", AddressClass::Private),
        ("::ffff:127.0.0.1", AddressClass::Loopback),
        ("::ffff:7f00:1", AddressClass::Loopback),
        ("::ffff:169.254.169.254", AddressClass::LinkLocal),
        ("::127.0.0.1", AddressClass::Loopback),
        ("::ffff:0:10.0.0.1", AddressClass::Private),
        ("64:ff9b::7f00:1", AddressClass::Loopback),
        ("64:ff9b::a9fe:a9fe", AddressClass::LinkLocal),
        ("64:ff9b:1::1", AddressClass::Private),
        ("2002:7f00:1::", AddressClass::Loopback),
        ("2002:c0a8:101::1", AddressClass::Private),
        ("ff02::1", AddressClass::Reserved("multicast")),
        ("224.0.0.1", AddressClass::Reserved("multicast")),
        ("255.255.255.255", AddressClass::Reserved("reserved or broadcast")),
        ("192.0.2.1", AddressClass::Reserved("documentation")),
        ("2001:db8::1", AddressClass::Reserved("documentation")),
        ("198.18.0.1", AddressClass::Reserved("benchmarking")),
        // Public: GitHub, GitLab and Bitbucket addresses, and a public IPv6 one.
        ("140.82.112.3", AddressClass::Public),
        ("172.65.251.78", AddressClass::Public),
        ("104.192.141.1", AddressClass::Public),
        ("172.32.0.1", AddressClass::Public),
        ("100.128.0.1", AddressClass::Public),
        ("2606:50c0:8000::154", AddressClass::Public),
        ("::ffff:140.82.112.3", AddressClass::Public),
        ("2002:8c52:7003::1", AddressClass::Public),
    ] {
        assert_eq!(class(address), expected, "{address}");
    }
}

/// Every spelling of an internal address from the SSRF corpus, in every URL form a
/// repository, API base URL or notification target can take, is refused with a message that
/// names the field, the host, the address and how to allow it.
#[tokio::test]
async fn the_ssrf_corpus_is_refused_with_a_clear_error() {
    let policy = OutboundPolicy::public_only();
    let corpus = [
        ("http://127.0.0.1/org/repo", "127.0.0.1"),
        ("http://localhost/org/repo", "127.0.0.1"),
        ("http://LOCALHOST./org/repo", "127.0.0.1"),
        ("http://app.localhost/org/repo", "127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://169.254.43518/x", "169.254.169.254"),
        ("http://10.0.0.5/org/repo", "10.0.0.5"),
        ("http://172.16.3.4/org/repo", "172.16.3.4"),
        ("http://192.168.0.1/org/repo", "192.168.0.1"),
        ("http://100.64.1.1/org/repo", "100.64.1.1"),
        ("http://0.0.0.0/org/repo", "0.0.0.0"),
        ("http://0/org/repo", "0.0.0.0"),
        ("http://[::]/org/repo", "::"),
        ("http://[::1]/org/repo", "::1"),
        ("http://[fe80::1%25eth0]/org/repo", "fe80::1"),
        ("http://[fd00::1]/org/repo", "fd00::1"),
        ("http://[::ffff:127.0.0.1]/org/repo", "::ffff:127.0.0.1"),
        ("http://[::ffff:7f00:1]/org/repo", "::ffff:127.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/latest", "::ffff:169.254.169.254"),
        ("http://[64:ff9b::7f00:1]/org/repo", "64:ff9b::7f00:1"),
        ("http://2130706433/org/repo", "127.0.0.1"),
        ("http://0x7f.1/org/repo", "127.0.0.1"),
        ("http://0x7f000001/org/repo", "127.0.0.1"),
        ("http://0177.0.0.1/org/repo", "127.0.0.1"),
        ("http://127.1/org/repo", "127.0.0.1"),
        ("http://%31%32%37.0.0.1/org/repo", "127.0.0.1"),
        ("http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/org/repo", "127.0.0.1"),
        ("http://github.com@127.0.0.1/org/repo", "127.0.0.1"),
        ("http://127.0.0.1@github.com@10.1.1.1/org/repo", "10.1.1.1"),
        ("http://127.0.0.1:8080/org/repo", "127.0.0.1"),
        ("http://127.0.0.1\\@github.com/org/repo", "127.0.0.1"),
        ("https://127.0.0.1#@github.com/org/repo", "127.0.0.1"),
        ("ssh://git@127.0.0.1/org/repo.git", "127.0.0.1"),
        ("ssh://git@0x7f.1:22/org/repo.git", "127.0.0.1"),
        ("git://2130706433/org/repo.git", "127.0.0.1"),
        ("git@127.1:org/repo.git", "127.0.0.1"),
        ("git@[::1]:org/repo.git", "::1"),
        ("git@0177.0.0.1:org/repo.git", "127.0.0.1"),
        ("git@localhost:org/repo.git", "127.0.0.1"),
        ("HTTP://127.0.0.1/org/repo", "127.0.0.1"),
    ];
    for (url, address) in corpus {
        let error = policy.check_url("repo_url", url, UrlKind::Repository).await.expect_err(url);
        let message = error.to_string();
        let shown_address = match &error {
            OutboundError::InternalAddress { address, .. } => address.to_string(),
            other => panic!("{url}: refused for the wrong reason: {other}"),
        };
        // `localhost` may resolve to ::1 as well as 127.0.0.1.
        assert!(shown_address == address || (url.contains("localhost") && shown_address == "::1"), "{url}: {message}");
        assert!(message.starts_with("repo_url refused: host "), "{url}: {message}");
        assert!(message.contains("[outbound] allow_hosts = [") && message.contains("allow_ranges = ["), "{url}: {message}");
        let api_error = ApiError::from(error);
        assert_eq!(
            (api_error.status, api_error.code, api_error.field.as_deref()),
            (StatusCode::BAD_REQUEST, "outbound_refused", Some("repo_url"))
        );
    }
    // The same corpus as API base URLs and notification targets.
    let error = policy.check_url("api_base_url", "https://0x7f.1/api/v3", UrlKind::Http).await.unwrap_err();
    assert!(error.to_string().starts_with("api_base_url refused: host \"0x7f.1\" is the address 127.0.0.1, a loopback address"), "{error}");
    let error = policy.check_notification_target(NotificationType::Slack, "https://169.254.169.254/hooks/x").await.unwrap_err();
    assert!(error.to_string().contains("169.254.169.254, a link-local address"), "{error}");
    // E-mail targets are not URLs and are not checked here.
    policy.check_notification_target(NotificationType::Email, "ops@127.0.0.1").await.unwrap();
}

#[tokio::test]
async fn other_refusals_say_what_to_do() {
    let policy = OutboundPolicy::public_only();
    let error = policy.check_url("repo_url", "file:///srv/git/repo.git", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("allow_file_urls = true"), "{error}");
    assert_eq!(error.code(), "outbound_refused");
    let error = policy.check_url("api_base_url", "ssh://git@github.com/org/repo", UrlKind::Http).await.unwrap_err();
    assert!(matches!(error, OutboundError::UnsupportedScheme { .. }), "{error}");
    assert_eq!(ApiError::from(error).code, "invalid_field");
    // A bracket left open is still read as the address it holds.
    let error = policy.check_url("repo_url", "https://[::1/x", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("::1, a loopback address"), "{error}");
    let error = policy.check_url("repo_url", "git@[0x7f.1:x", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("127.0.0.1, a loopback address"), "{error}");
    let error = policy.check_url("repo_url", "http://[[[127.0.0.1]]]/x", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("127.0.0.1, a loopback address"), "{error}");
    // A megabyte of brackets is read in one pass, not one call per bracket.
    let brackets = format!("http://{}/x", "[".repeat(1 << 20));
    policy.check_url("target", &brackets, UrlKind::Http).await.unwrap();
    let error = policy.check_url("repo_url", "https:///x", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("no host"), "{error}");
    let allowed = OutboundPolicy::new(&OutboundSettings { allow_file_urls: true, ..Default::default() }).unwrap();
    allowed.check_url("repo_url", "file:///srv/git/repo.git", UrlKind::Repository).await.unwrap();
    assert_eq!(allowed.git_allowed_protocols(), "https:ssh:git:file");
    assert_eq!(policy.git_allowed_protocols(), "https:ssh:git");
}

/// Public addresses and names pass. Names here do not resolve without a network (and then
/// pass at connect time, to be checked again at connection time); literals are classified.
#[tokio::test]
async fn public_targets_are_accepted() {
    let policy = OutboundPolicy::public_only();
    for url in [
        "https://140.82.112.3/org/repo",
        "https://[2606:50c0:8000::154]/org/repo",
        "https://github.com/org/repo",
        "git@github.com:org/repo.git",
        "ssh://git@gitlab.com:22/org/repo.git",
        "git://git.kernel.org/pub/scm/git/git.git",
        "https://user:token@bitbucket.org/org/repo.git",
    ] {
        policy.check_url("repo_url", url, UrlKind::Repository).await.unwrap_or_else(|error| panic!("{url}: {error}"));
    }
}

/// `localhost` is resolved (not only recognized by name), and the address it resolves to is
/// what an allowed range is matched against.
#[tokio::test]
async fn names_are_resolved_and_every_address_checked() {
    let error =
        OutboundPolicy::public_only().check_url("repo_url", "https://localhost:8443/org/repo", UrlKind::Repository).await.unwrap_err();
    assert!(error.to_string().contains("\"localhost\" resolves to"), "the name was not resolved: {error}");
    allowing_ranges(&["127.0.0.0/8", "::1"]).check_url("repo_url", "https://localhost/org/repo", UrlKind::Repository).await.unwrap();
}

#[tokio::test]
async fn allow_lists_let_an_admin_reach_a_private_forge() {
    let by_host = policy(OutboundSettings { allow_hosts: vec!["LocalHost".into()], ..Default::default() });
    by_host.check_url("repo_url", "https://localhost/org/repo", UrlKind::Repository).await.unwrap();
    by_host.check_url("repo_url", "git@localhost.:org/repo.git", UrlKind::Repository).await.unwrap();
    // The host list is of names: the address itself is still refused.
    by_host.check_url("repo_url", "https://127.0.0.1/org/repo", UrlKind::Repository).await.unwrap_err();

    let by_range = allowing_ranges(&["10.20.0.0/16", "fd00::/8"]);
    by_range.check_url("repo_url", "https://10.20.3.4/org/repo", UrlKind::Repository).await.unwrap();
    by_range.check_url("repo_url", "https://0x0a.20.0x304/org/repo", UrlKind::Repository).await.unwrap();
    by_range.check_url("repo_url", "https://[::ffff:10.20.3.4]/org/repo", UrlKind::Repository).await.unwrap();
    by_range.check_url("repo_url", "https://[fd00::5]/org/repo", UrlKind::Repository).await.unwrap();
    by_range.check_url("repo_url", "https://10.21.0.1/org/repo", UrlKind::Repository).await.unwrap_err();
    by_range.check_url("repo_url", "https://169.254.169.254/", UrlKind::Repository).await.unwrap_err();

    let developer = policy(OutboundSettings { allow_private_networks: true, ..Default::default() });
    for url in ["http://127.0.0.1/x", "http://10.0.0.1/x", "http://169.254.169.254/x", "http://[::1]/x", "git@localhost:x", "http://0/x"] {
        developer.check_url("repo_url", url, UrlKind::Repository).await.unwrap_or_else(|error| panic!("{url}: {error}"));
    }
    // Only a range allows a special-purpose address on `serve`.
    OutboundPolicy::public_only().check_url("repo_url", "http://224.0.0.1/x", UrlKind::Repository).await.unwrap_err();
    allowing_ranges(&["224.0.0.0/4"]).check_url("repo_url", "http://224.0.0.1/x", UrlKind::Repository).await.unwrap();
    assert!(developer.describe().contains("loopback, private and link-local"));
}

#[test]
fn bad_allow_lists_are_refused_at_config_load_with_the_fix() {
    let error = |settings: OutboundSettings| OutboundPolicy::new(&settings).unwrap_err();
    let ranges = |range: &str| OutboundSettings { allow_ranges: vec![range.into()], ..Default::default() };
    assert!(error(ranges("10.0.0.1/8")).contains("did you mean \"10.0.0.0/8\""), "{}", error(ranges("10.0.0.1/8")));
    assert!(error(ranges("10.0.0.0/33")).contains("from 0 to 32"));
    assert!(error(ranges("fd00::/129")).contains("from 0 to 128"));
    assert!(error(ranges("intranet")).contains("\"intranet\" is not an IPv4 or IPv6 address"));
    OutboundPolicy::new(&ranges("10.0.0.0/8")).unwrap();
    let hosts = |host: &str| OutboundSettings { allow_hosts: vec![host.into()], ..Default::default() };
    assert!(error(hosts("10.0.0.5")).contains("allow_ranges, e.g. [\"10.0.0.5/32\"]"));
    assert!(error(hosts("https://git.internal")).contains("plain host name"));
    let range = AddressRange::parse("192.168.0.0/16").unwrap();
    assert!(range.contains("192.168.255.1".parse().unwrap()) && !range.contains("192.169.0.1".parse().unwrap()));
    assert!(!range.contains("::ffff:192.168.0.1".parse().unwrap()), "a range matches its own family; check_address unwraps");
    assert!(AddressRange::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
}

/// A local HTTP server answering `/` with 200 and `/redirect?to=URL` with a 302 to URL.
async fn local_server(ip: [u8; 4]) -> SocketAddr {
    use axum::extract::Query;
    use axum::response::Redirect;
    use axum::routing::get;
    let app = axum::Router::new().route("/", get(|| async { "reached" })).route(
        "/redirect",
        get(|Query(query): Query<std::collections::HashMap<String, String>>| async move { Redirect::temporary(&query["to"]) }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0))).await.expect("bind a loopback port");
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// The whole error chain of a reqwest error, where the policy's message sits.
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn the_http_client_refuses_internal_addresses_when_it_connects() {
    let server = local_server([127, 0, 0, 1]).await;
    let port = server.port();
    let refusing = Arc::new(OutboundPolicy::public_only()).http_client().unwrap();
    // An address literal (the resolver is not asked), its inet_aton spelling, and a name.
    for url in [format!("http://127.0.0.1:{port}/"), format!("http://0x7f.1:{port}/"), format!("http://localhost:{port}/")] {
        let error = refusing.get(&url).send().await.expect_err(&url);
        let chain = error_chain(&error);
        assert!(chain.contains("a loopback address") && chain.contains("allow_ranges"), "{url}: {chain}");
    }
    let allowing = allowing_ranges(&["127.0.0.0/8"]).http_client().unwrap();
    let response = allowing.get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "reached");
    // A name in allow_hosts reaches the internal address it resolves to.
    let by_name = policy(OutboundSettings { allow_hosts: vec!["localhost".into()], ..Default::default() }).http_client().unwrap();
    let response = by_name.get(format!("http://localhost:{port}/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "reached");
}

#[tokio::test]
async fn every_redirect_is_checked() {
    let target = local_server([127, 0, 0, 1]).await;
    let allowed_host = local_server([127, 0, 0, 2]).await;
    let client = allowing_ranges(&["127.0.0.2/32"]).http_client().unwrap();
    let direct = client.get(format!("http://{allowed_host}/")).send().await.unwrap();
    assert_eq!(direct.text().await.unwrap(), "reached");
    for to in [format!("http://{target}/"), format!("http://2130706433:{}/", target.port()), format!("http://localhost:{}/", target.port())]
    {
        let error = client.get(format!("http://{allowed_host}/redirect?to={to}")).send().await.expect_err(&to);
        let chain = error_chain(&error);
        assert!(chain.contains("loopback address"), "{to}: {chain}");
    }
    // A redirect within what is allowed is followed, up to MAX_REDIRECTS.
    let to_self = format!("http://{allowed_host}/");
    let followed = client.get(format!("http://{allowed_host}/redirect?to={to_self}")).send().await.unwrap();
    assert_eq!(followed.text().await.unwrap(), "reached");
    let mut url = to_self;
    for _ in 0..=MAX_REDIRECTS {
        url = format!("http://{allowed_host}/redirect?to={}", urlencode(&url));
    }
    let error = client.get(&url).send().await.unwrap_err();
    assert!(error_chain(&error).contains("more than 5 redirects"), "{}", error_chain(&error));
    // A redirect to another scheme is not followed: the 307 itself is the answer.
    let unfollowed = client.get(format!("http://{allowed_host}/redirect?to=file:///etc/passwd")).send().await.unwrap();
    assert_eq!(unfollowed.status(), 307);
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Over TLS the peer check still sees the address reached (reqwest's TLS connection passes the
/// TCP connection's info through): allowed, the request goes through; refused, it does not.
#[tokio::test]
async fn the_peer_check_sees_through_tls() {
    let directory = tempfile::tempdir().unwrap();
    crate::tls::generate_cluster_certs(directory.path(), &[(1, vec!["127.0.0.1".into()])]).unwrap();
    let files = crate::tls::TlsFiles {
        ca_file: directory.path().join("ca.pem"),
        cert_file: directory.path().join("node-1.pem"),
        key_file: directory.path().join("node-1-key.pem"),
    };
    let material = crate::tls::TlsMaterial::load(&files).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(material.rustls_http_server().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "reached over TLS" }));
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let ca = reqwest::Certificate::from_pem(material.ca_pem()).unwrap();
    let url = format!("https://{address}/");
    let allowing = allowing_ranges(&["127.0.0.1/32"]).http_client_builder().add_root_certificate(ca.clone()).build().unwrap();
    assert_eq!(allowing.get(&url).send().await.unwrap().text().await.unwrap(), "reached over TLS");
    let refusing = Arc::new(OutboundPolicy::public_only()).http_client_builder().add_root_certificate(ca).build().unwrap();
    let chain = error_chain(&refusing.get(&url).send().await.unwrap_err());
    assert!(chain.contains("127.0.0.1, a loopback address"), "{chain}");
}

/// The pin is what real git uses: a URL naming a host that does not resolve reaches the local
/// server only through the resolve list `git_arguments_for` returns for `localhost`.
#[tokio::test]
async fn git_is_pinned_to_the_addresses_checked() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (StatusCode::NOT_FOUND, "no repository here")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let refused = OutboundPolicy::public_only().git_arguments_for("repo_url", &format!("http://localhost:{port}/org/repo.git")).await;
    assert!(refused.unwrap_err().to_string().contains("a loopback address"));
    let policy = allowing_ranges(&["127.0.0.0/8", "::1/128"]);
    let arguments = policy.git_arguments_for("repo_url", &format!("http://localhost:{port}/org/repo.git")).await.unwrap();
    assert_eq!(arguments.first().map(String::as_str), Some("-c"), "{arguments:?}");
    assert!(arguments[1].starts_with(&format!("http.curloptResolve=localhost:{port}:")), "{arguments:?}");
    assert!(policy.git_arguments_for("repo_url", "ssh://git@github.com/org/repo.git").await.unwrap().is_empty());

    // Point the pin at a name that resolves nowhere: only the pin can bring git to the server.
    let pin = arguments[1].replacen("localhost", "davit-pinned.invalid", 1);
    let output = tokio::process::Command::new("git")
        .args(["-c", &pin, "ls-remote", &format!("http://davit-pinned.invalid:{port}/org/repo.git")])
        .env("GIT_ALLOW_PROTOCOL", "http")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .await
        .expect("run git");
    assert!(!output.status.success(), "the stand-in server has no repository");
    assert!(requests.load(Ordering::SeqCst) > 0, "git did not reach the pinned address: {}", String::from_utf8_lossy(&output.stderr));
}
