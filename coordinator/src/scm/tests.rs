//! The webhook parser against the providers' published payloads (copied unchanged into
//! `coordinator/tests/fixtures/webhooks/`, see SOURCES.md there) and against hostile input.

use sha2::{Digest, Sha256};

use super::events::*;
use crate::state::records::ScmType;

macro_rules! fixture {
    ($name:literal) => {
        ($name, include_bytes!(concat!("../../tests/fixtures/webhooks/", $name)) as &[u8])
    };
}

const FIXTURES: [(&str, &[u8]); 8] = [
    fixture!("github-push.json"),
    fixture!("github-push-tag-deleted.json"),
    fixture!("github-pull_request-opened.json"),
    fixture!("github-pull_request-synchronize.json"),
    fixture!("gitlab-push.json"),
    fixture!("gitlab-merge_request.json"),
    fixture!("bitbucket-repo-push.json"),
    fixture!("bitbucket-pullrequest-created.json"),
];

const SOURCES: &str = include_str!("../../tests/fixtures/webhooks/SOURCES.md");

fn fixture(name: &str) -> &'static [u8] {
    FIXTURES.iter().find(|(file, _)| *file == name).map(|(_, bytes)| *bytes).expect("a fixture listed in FIXTURES")
}

fn parse(provider: ScmType, event: &str, name: &str) -> Delivery {
    parse_delivery(provider, Some(event), fixture(name), Some("application/json")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn single_event(delivery: &Delivery) -> &ScmEvent {
    match delivery.outcomes.as_slice() {
        [Outcome::Event(event)] => event,
        other => panic!("expected one event, got {other:?}"),
    }
}

fn push_of(delivery: &Delivery) -> &Push {
    match single_event(delivery) {
        ScmEvent::Push(push) => push,
        other => panic!("expected a push, got {other:?}"),
    }
}

fn pull_request_of(delivery: &Delivery) -> &PullRequest {
    match single_event(delivery) {
        ScmEvent::PullRequest(pull) => pull,
        other => panic!("expected a pull request, got {other:?}"),
    }
}

#[test]
fn fixtures_are_the_published_bytes() {
    // The digests in SOURCES.md's first block; the second block holds HMACs of the same files.
    let digests = SOURCES.split("SHA-256 of each file").nth(1).and_then(|rest| rest.split("## Headers").next()).expect("the digest block");
    let listed: Vec<(&str, &str)> = digests
        .lines()
        .filter_map(|line| line.split_once("  "))
        .filter(|(digest, _)| digest.len() == 64 && digest.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .collect();
    assert_eq!(listed.len(), FIXTURES.len(), "SOURCES.md lists every fixture once");
    for (name, bytes) in FIXTURES {
        let expected = listed.iter().find(|(_, file)| *file == name).unwrap_or_else(|| panic!("{name} is not in SOURCES.md")).0;
        assert_eq!(crate::state::apply::hex(&Sha256::digest(bytes)), expected, "{name} was changed");
    }
}

#[test]
fn github_push_that_creates_a_branch() {
    let delivery = parse(ScmType::Github, "push", "github-push.json");
    assert_eq!(
        delivery.repository_urls,
        [
            "https://github.com/Codertocat/Hello-World",
            "https://github.com/Codertocat/Hello-World.git",
            "git@github.com:Codertocat/Hello-World.git",
            "git://github.com/Codertocat/Hello-World.git",
        ]
    );
    let push = push_of(&delivery);
    assert_eq!(push.branch, "master");
    assert_eq!(push.before, None, "an all-zero before means the branch is new");
    assert_eq!(push.after, "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
    assert!(push.created);
    let head = push.head_commit.as_ref().expect("head_commit");
    assert_eq!(head.message, "Initial commit");
    assert_eq!(head.author.as_deref(), Some("Codertocat <21031067+Codertocat@users.noreply.github.com>"));
}

#[test]
fn github_tag_deletion_is_ignored_with_the_reason() {
    let delivery = parse(ScmType::Github, "push", "github-push-tag-deleted.json");
    assert_eq!(delivery.repository_urls[0], "https://github.com/Codertocat/Hello-World");
    match delivery.outcomes.as_slice() {
        [Outcome::Ignored(ignored)] => {
            assert!(ignored.reason.contains("tag simple-tag was deleted"), "{}", ignored.reason);
        }
        other => panic!("expected the deletion to be ignored, got {other:?}"),
    }
}

#[test]
fn github_pull_request_opened_and_synchronized() {
    for (name, action) in [
        ("github-pull_request-opened.json", PullRequestAction::Opened),
        ("github-pull_request-synchronize.json", PullRequestAction::Synchronized),
    ] {
        let delivery = parse(ScmType::Github, "pull_request", name);
        assert!(delivery.repository_urls.contains(&"https://github.com/Codertocat/Hello-World".to_string()), "{name}");
        let pull = pull_request_of(&delivery);
        assert_eq!(pull.number, 2, "{name}");
        assert_eq!(pull.action, action, "{name}");
        assert!(pull.action.runs_checks());
        assert_eq!(pull.title, "Update the README with new information.");
        assert_eq!(pull.source_branch, "changes");
        assert_eq!(pull.head_commit.as_deref(), Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821"));
        assert_eq!(pull.target_branch, "master");
        assert_eq!(pull.merge_ref.as_deref(), Some("refs/pull/2/merge"));
        assert_eq!(pull.source_repository_url.as_deref(), Some("https://github.com/Codertocat/Hello-World.git"));
        assert_eq!(pull.merge_commit, None);
    }
}

/// The fixture with its JSON edited by `edit`, re-serialized (fine here: nothing is signed).
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(fixture(name)).unwrap();
    edit(&mut value);
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn github_pull_request_closed_merged_and_other_actions() {
    let closed = |merged: bool| {
        edited("github-pull_request-opened.json", |value| {
            value["action"] = "closed".into();
            value["pull_request"]["merged"] = merged.into();
            value["pull_request"]["merge_commit_sha"] = "c4295bd74fb0f4d6d4a2e9d2d3b0f1a8d5c6e7f8".into();
        })
    };
    let delivery = parse_delivery(ScmType::Github, Some("pull_request"), &closed(true), None).unwrap();
    let pull = pull_request_of(&delivery);
    assert_eq!(pull.action, PullRequestAction::Merged);
    assert!(!pull.action.runs_checks());
    assert_eq!(pull.merge_commit.as_deref(), Some("c4295bd74fb0f4d6d4a2e9d2d3b0f1a8d5c6e7f8"));
    let delivery = parse_delivery(ScmType::Github, Some("pull_request"), &closed(false), None).unwrap();
    assert_eq!(pull_request_of(&delivery).action, PullRequestAction::Closed);
    assert_eq!(pull_request_of(&delivery).merge_commit, None, "a closed pull request has no merge commit");
    let reopened = edited("github-pull_request-opened.json", |value| value["action"] = "reopened".into());
    let delivery = parse_delivery(ScmType::Github, Some("pull_request"), &reopened, None).unwrap();
    assert_eq!(pull_request_of(&delivery).action, PullRequestAction::Reopened);
    let labeled = edited("github-pull_request-opened.json", |value| value["action"] = "labeled".into());
    let delivery = parse_delivery(ScmType::Github, Some("pull_request"), &labeled, None).unwrap();
    assert!(matches!(&delivery.outcomes[..], [Outcome::Ignored(ignored)] if ignored.reason.contains("#2 was labeled")), "{delivery:?}");
}

#[test]
fn github_push_to_an_existing_branch_and_a_tag_push() {
    let moved = edited("github-push.json", |value| {
        value["ref"] = "refs/heads/release/1.0".into();
        value["before"] = "95790bf891e76fee5e1747ab589903a6a1f80f22".into();
        value["created"] = false.into();
    });
    let delivery = parse_delivery(ScmType::Github, Some("push"), &moved, None).unwrap();
    let push = push_of(&delivery);
    assert_eq!(push.branch, "release/1.0");
    assert_eq!(push.before.as_deref(), Some("95790bf891e76fee5e1747ab589903a6a1f80f22"));
    assert!(!push.created);
    let tag = edited("github-push.json", |value| value["ref"] = "refs/tags/v1.2.3".into());
    let delivery = parse_delivery(ScmType::Github, Some("push"), &tag, None).unwrap();
    assert_eq!(
        single_event(&delivery),
        &ScmEvent::TagPush(TagPush { tag: "v1.2.3".into(), commit: "6113728f27ae82c7b1a177c8d03f9e96e0adf246".into() })
    );
    let branch_deleted = edited("github-push-tag-deleted.json", |value| value["ref"] = "refs/heads/old".into());
    let delivery = parse_delivery(ScmType::Github, Some("push"), &branch_deleted, None).unwrap();
    assert!(matches!(&delivery.outcomes[..], [Outcome::Ignored(ignored)] if ignored.reason.contains("branch old was deleted")));
}

/// `application/x-www-form-urlencoded` with every byte outside the unreserved set escaped.
fn form_encode(json: &[u8]) -> Vec<u8> {
    let mut body = b"payload=".to_vec();
    for &byte in json {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            body.push(byte);
        } else if byte == b' ' {
            body.push(b'+');
        } else {
            body.extend(format!("%{byte:02X}").bytes());
        }
    }
    body
}

#[test]
fn a_form_encoded_github_delivery_parses_like_the_json_one() {
    for (name, event) in
        [("github-push.json", "push"), ("github-pull_request-opened.json", "pull_request"), ("github-push-tag-deleted.json", "push")]
    {
        let json = parse(ScmType::Github, event, name);
        let form = form_encode(fixture(name));
        let with_other_fields = [b"x=1&".to_vec(), form.clone(), b"&y".to_vec()].concat();
        for body in [form, with_other_fields] {
            for content_type in ["application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=utf-8"] {
                let parsed = parse_delivery(ScmType::Github, Some(event), &body, Some(content_type)).unwrap();
                assert_eq!(parsed, json, "{name} as {content_type}");
            }
        }
    }
    let error = parse_delivery(ScmType::Github, Some("push"), b"other=1", Some("application/x-www-form-urlencoded")).unwrap_err();
    assert!(matches!(error, ParseError::Form { .. }), "{error}");
    let error = parse_delivery(ScmType::Github, Some("push"), b"payload=%7%", Some("application/x-www-form-urlencoded")).unwrap_err();
    assert!(error.to_string().contains("malformed percent escape"), "{error}");
}

#[test]
fn gitlab_push() {
    let delivery = parse(ScmType::Gitlab, "Push Hook", "gitlab-push.json");
    for url in ["http://example.com/mike/diaspora", "http://example.com/mike/diaspora.git", "git@example.com:mike/diaspora.git"] {
        assert!(delivery.repository_urls.contains(&url.to_string()), "{url} in {:?}", delivery.repository_urls);
    }
    let push = push_of(&delivery);
    assert_eq!(push.branch, "master");
    assert_eq!(push.before.as_deref(), Some("95790bf891e76fee5e1747ab589903a6a1f80f22"));
    assert_eq!(push.after, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
    assert!(!push.created);
    let head = push.head_commit.as_ref().expect("the head is among the listed commits");
    assert_eq!(head.message, "fixed readme");
    assert_eq!(head.author.as_deref(), Some("GitLab dev user <gitlabdev@dv6700.(none)>"));
}

#[test]
fn gitlab_tag_push_and_deletions() {
    let tag = edited("gitlab-push.json", |value| {
        value["object_kind"] = "tag_push".into();
        value["ref"] = "refs/tags/v1.0.0".into();
    });
    let delivery = parse_delivery(ScmType::Gitlab, Some("Tag Push Hook"), &tag, None).unwrap();
    assert_eq!(
        single_event(&delivery),
        &ScmEvent::TagPush(TagPush { tag: "v1.0.0".into(), commit: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into() })
    );
    let deleted = edited("gitlab-push.json", |value| {
        value["ref"] = "refs/tags/v1.0.0".into();
        value["after"] = "0000000000000000000000000000000000000000".into();
    });
    let delivery = parse_delivery(ScmType::Gitlab, Some("Tag Push Hook"), &deleted, None).unwrap();
    assert!(matches!(&delivery.outcomes[..], [Outcome::Ignored(ignored)] if ignored.reason.contains("tag v1.0.0 was deleted")));
    let created = edited("gitlab-push.json", |value| value["before"] = "0000000000000000000000000000000000000000".into());
    let delivery = parse_delivery(ScmType::Gitlab, Some("Push Hook"), &created, None).unwrap();
    assert!(push_of(&delivery).created);
    assert_eq!(push_of(&delivery).before, None);
}

#[test]
fn gitlab_merge_request_actions() {
    let delivery = parse(ScmType::Gitlab, "Merge Request Hook", "gitlab-merge_request.json");
    assert!(delivery.repository_urls.contains(&"http://example.com/gitlabhq/gitlab-test".to_string()));
    let request = pull_request_of(&delivery);
    assert_eq!(request.number, 1, "the IID, not the global id 99");
    assert_eq!(request.action, PullRequestAction::Opened);
    assert_eq!(request.title, "MS-Viewport");
    assert_eq!(request.source_branch, "ms-viewport");
    assert_eq!(request.target_branch, "master");
    assert_eq!(request.head_commit.as_deref(), Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7"));
    assert_eq!(request.merge_ref.as_deref(), Some("refs/merge-requests/1/merge"));
    assert_eq!(request.source_repository_url.as_deref(), Some("http://example.com/awesome_space/awesome_project.git"));

    let with_action = |action: &str, oldrev: Option<&str>| {
        edited("gitlab-merge_request.json", |value| {
            value["object_attributes"]["action"] = action.into();
            if let Some(oldrev) = oldrev {
                value["object_attributes"]["oldrev"] = oldrev.into();
            }
        })
    };
    let action_of = |body: Vec<u8>| parse_delivery(ScmType::Gitlab, Some("Merge Request Hook"), &body, None).unwrap().outcomes;
    let event_action = |outcomes: Vec<Outcome>| match &outcomes[..] {
        [Outcome::Event(ScmEvent::PullRequest(request))] => Some(request.action),
        _ => None,
    };
    assert_eq!(
        event_action(action_of(with_action("update", Some("95790bf891e76fee5e1747ab589903a6a1f80f22")))),
        Some(PullRequestAction::Synchronized)
    );
    assert_eq!(event_action(action_of(with_action("update", None))), None, "an update without new commits is ignored");
    assert_eq!(event_action(action_of(with_action("reopen", None))), Some(PullRequestAction::Reopened));
    assert_eq!(event_action(action_of(with_action("close", None))), Some(PullRequestAction::Closed));
    assert_eq!(event_action(action_of(with_action("merge", None))), Some(PullRequestAction::Merged));
    assert_eq!(event_action(action_of(with_action("approved", None))), None);
}

#[test]
fn bitbucket_push() {
    let delivery = parse(ScmType::Bitbucket, "repo:push", "bitbucket-repo-push.json");
    assert_eq!(delivery.repository_urls, ["https://bitbucket.org/martinherren1984/publictestrepo"]);
    let push = push_of(&delivery);
    assert_eq!(push.branch, "main");
    assert_eq!(push.before.as_deref(), Some("a51241ae1f00cbe728930db48e890b18fd527f99"));
    assert_eq!(push.after, "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277");
    assert!(!push.created);
    let head = push.head_commit.as_ref().expect("head commit");
    assert_eq!(head.message, "a\n");
    assert_eq!(head.author.as_deref(), Some("Martin Herren <martin.herren@yyy.com>"));
}

#[test]
fn a_bitbucket_push_with_several_changes_gives_one_outcome_each() {
    let body = edited("bitbucket-repo-push.json", |value| {
        let change = value["push"]["changes"][0].clone();
        let mut created = change.clone();
        created["old"] = serde_json::Value::Null;
        created["new"]["name"] = "feature/x".into();
        let mut tag = change.clone();
        tag["old"] = serde_json::Value::Null;
        tag["new"]["type"] = "tag".into();
        tag["new"]["name"] = "v2".into();
        let mut deleted = change.clone();
        deleted["new"] = serde_json::Value::Null;
        deleted["old"]["name"] = "gone".into();
        value["push"]["changes"] = serde_json::json!([change, created, tag, deleted]);
    });
    let delivery = parse_delivery(ScmType::Bitbucket, Some("repo:push"), &body, None).unwrap();
    let [
        Outcome::Event(ScmEvent::Push(main)),
        Outcome::Event(ScmEvent::Push(created)),
        Outcome::Event(ScmEvent::TagPush(tag)),
        Outcome::Ignored(deleted),
    ] = &delivery.outcomes[..]
    else {
        panic!("unexpected outcomes {:?}", delivery.outcomes);
    };
    assert_eq!(main.branch, "main");
    assert_eq!((created.branch.as_str(), created.created, created.before.as_deref()), ("feature/x", true, None));
    assert_eq!((tag.tag.as_str(), tag.commit.as_str()), ("v2", "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277"));
    assert!(deleted.reason.contains("branch gone was deleted"), "{}", deleted.reason);
}

#[test]
fn bitbucket_pull_request_events() {
    let delivery = parse(ScmType::Bitbucket, "pullrequest:created", "bitbucket-pullrequest-created.json");
    assert_eq!(delivery.repository_urls, ["https://bitbucket.org/6543/collect-webhooks"]);
    let pull = pull_request_of(&delivery);
    assert_eq!(pull.number, 2);
    assert_eq!(pull.action, PullRequestAction::Opened);
    assert_eq!(pull.title, "aha");
    assert_eq!(pull.source_branch, "wen-emos");
    assert_eq!(pull.target_branch, "niam");
    assert_eq!(pull.head_commit.as_deref(), Some("39f188d78e1e"), "Bitbucket sends abbreviated hashes");
    assert_eq!(pull.merge_ref, None, "Bitbucket has no merge ref: checks run on the head");
    assert_eq!(pull.source_repository_url.as_deref(), Some("https://bitbucket.org/6543/collect-webhooks"));
    for (event, action) in [
        ("pullrequest:updated", PullRequestAction::Synchronized),
        ("pullrequest:fulfilled", PullRequestAction::Merged),
        ("pullrequest:rejected", PullRequestAction::Closed),
    ] {
        let delivery = parse(ScmType::Bitbucket, event, "bitbucket-pullrequest-created.json");
        assert_eq!(pull_request_of(&delivery).action, action, "{event}");
    }
    let delivery = parse(ScmType::Bitbucket, "pullrequest:approved", "bitbucket-pullrequest-created.json");
    assert!(matches!(&delivery.outcomes[..], [Outcome::Ignored(_)]));
}

#[test]
fn other_events_are_ignored_with_a_reason() {
    for (provider, event, name) in [
        (ScmType::Github, "ping", "github-push.json"),
        (ScmType::Github, "issues", "github-push.json"),
        (ScmType::Gitlab, "Issue Hook", "gitlab-push.json"),
        (ScmType::Bitbucket, "issue:created", "bitbucket-repo-push.json"),
    ] {
        let delivery = parse(provider, event, name);
        assert!(!delivery.repository_urls.is_empty());
        assert!(matches!(&delivery.outcomes[..], [Outcome::Ignored(ignored)] if !ignored.reason.is_empty()), "{event}: {delivery:?}");
    }
}

#[test]
fn delivery_headers_are_named_per_provider() {
    assert_eq!(event_header(ScmType::Github), "x-github-event");
    assert_eq!(event_header(ScmType::Gitlab), "x-gitlab-event");
    assert_eq!(event_header(ScmType::Bitbucket), "x-event-key");
    assert_eq!(delivery_id_headers(ScmType::Github), ["x-github-delivery"]);
    assert_eq!(delivery_id_headers(ScmType::Gitlab)[0], "idempotency-key", "the key retries keep comes first");
    assert_eq!(delivery_id_headers(ScmType::Bitbucket), ["x-request-uuid"]);
    let error = parse_delivery(ScmType::Gitlab, None, fixture("gitlab-push.json"), None).unwrap_err();
    assert!(error.to_string().contains("X-Gitlab-Event header is missing"), "{error}");
    assert!(parse_delivery(ScmType::Github, Some("  "), fixture("github-push.json"), None).is_err());
}

#[test]
fn bodies_that_are_not_deliveries_are_errors_naming_the_problem() {
    let error = |provider, event: &str, body: &[u8]| parse_delivery(provider, Some(event), body, None).unwrap_err().to_string();
    assert!(error(ScmType::Github, "push", b"this is not json").contains("not a valid"));
    assert!(error(ScmType::Github, "push", b"[1, 2]").contains("not a valid"));
    assert!(error(ScmType::Github, "push", b"{} trailing").contains("trailing"));
    assert!(error(ScmType::Github, "push", b"").contains("empty"));
    assert!(error(ScmType::Github, "push", b"{").contains("EOF"));
    let wrong_type = edited("github-push.json", |value| value["ref"] = 5.into());
    assert!(error(ScmType::Github, "push", &wrong_type).contains("ref: invalid type"), "{}", error(ScmType::Github, "push", &wrong_type));
    let no_after = edited("github-push.json", |value| {
        value.as_object_mut().unwrap().remove("after");
    });
    assert!(error(ScmType::Github, "push", &no_after).contains("missing field `after`"));
    let bad_sha = edited("github-push.json", |value| value["after"] = "not-a-sha; rm -rf /".into());
    assert!(error(ScmType::Github, "push", &bad_sha).contains("not a commit id"));
    let option_branch = edited("github-push.json", |value| value["ref"] = "refs/heads/--upload-pack=evil".into());
    assert!(error(ScmType::Github, "push", &option_branch).contains("not a branch or tag name"));
    let negative = edited("github-pull_request-opened.json", |value| value["pull_request"]["number"] = (-2).into());
    assert!(error(ScmType::Github, "pull_request", &negative).contains("pull_request.number"));
    // Before the signature is checked, URL fields of another type are not URLs, not errors.
    let url_type = edited("github-push.json", |value| value["repository"]["html_url"] = serde_json::json!({"x": 1}));
    let urls = repository_urls(&url_type).unwrap();
    assert_eq!(urls.first().map(String::as_str), Some("https://github.com/Codertocat/Hello-World.git"));
    assert_eq!(repository_urls(br#"{"repository": 5, "project": [1]}"#).unwrap(), Vec::<String>::new());
    assert!(repository_urls(b"  [1, 2]").unwrap_err().to_string().contains("not a JSON object"));
    let no_commit =
        edited("bitbucket-pullrequest-created.json", |value| value["pullrequest"]["source"]["commit"] = serde_json::Value::Null);
    assert!(error(ScmType::Bitbucket, "pullrequest:created", &no_commit).contains("pullrequest.source.commit"));
    let no_head = edited("gitlab-merge_request.json", |value| value["object_attributes"]["last_commit"] = serde_json::Value::Null);
    assert!(error(ScmType::Gitlab, "Merge Request Hook", &no_head).contains("object_attributes.last_commit"));
    let no_changes = edited("bitbucket-repo-push.json", |value| value["push"]["changes"] = "x".into());
    assert!(error(ScmType::Bitbucket, "repo:push", &no_changes).contains("push.changes"));
}

#[test]
fn huge_and_deep_inputs_are_refused() {
    let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(parse_delivery(ScmType::Github, Some("push"), &huge, None), Err(ParseError::TooLarge { .. })));
    // Nesting beyond serde_json's recursion limit is an error, not a stack overflow, both where
    // a field is read and where an unknown field is skipped.
    let depth = 100_000;
    let deep_array = [vec![b'['; depth], vec![b']'; depth]].concat();
    let deep_unknown = [b"{\"x\":".repeat(depth), vec![b'}'; depth]].concat();
    let deep_known = [b"{\"repository\":".to_vec(), b"{\"links\":".repeat(depth), vec![b'}'; depth + 1]].concat();
    for body in [deep_array, deep_unknown, deep_known] {
        for provider in [ScmType::Github, ScmType::Gitlab, ScmType::Bitbucket] {
            assert!(parse_delivery(provider, Some("push"), &body, None).is_err());
        }
    }
}

/// Every outcome for every provider and event on `body`; the test is that this returns.
fn parse_everything(body: &[u8]) {
    for (provider, events) in [
        (ScmType::Github, &["push", "pull_request", "ping"][..]),
        (ScmType::Gitlab, &["Push Hook", "Tag Push Hook", "Merge Request Hook"][..]),
        (ScmType::Bitbucket, &["repo:push", "pullrequest:created", "pullrequest:fulfilled"][..]),
    ] {
        for event in events {
            let _ = parse_delivery(provider, Some(event), body, None);
            let _ = parse_delivery(provider, Some(event), body, Some("application/x-www-form-urlencoded"));
        }
    }
}

#[test]
fn truncated_and_mangled_fixtures_never_panic() {
    for (name, bytes) in FIXTURES {
        let step = (bytes.len() / 150).max(1);
        for end in (0..bytes.len()).step_by(step) {
            let truncated = &bytes[..end];
            parse_everything(truncated);
            assert!(parse_delivery(ScmType::Github, Some("push"), truncated, None).is_err(), "{name} cut at {end} still parsed");
        }
    }
    // Deterministic pseudo-random byte flips and garbage.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (_, bytes) in FIXTURES {
        for _ in 0..40 {
            let mut mangled = bytes.to_vec();
            for _ in 0..4 {
                let at = (next() % mangled.len() as u64) as usize;
                mangled[at] = next() as u8;
            }
            parse_everything(&mangled);
        }
    }
    for length in [0, 1, 7, 64, 1000] {
        let garbage: Vec<u8> = (0..length).map(|_| next() as u8).collect();
        parse_everything(&garbage);
        parse_everything(&form_encode(&garbage));
    }
}

#[test]
fn a_plain_git_repository_has_no_webhooks() {
    let error = parse_delivery(ScmType::Git, Some("push"), fixture("github-push.json"), Some("application/json")).unwrap_err();
    assert!(matches!(error, ParseError::NoWebhooks));
    assert!(error.to_string().contains("git ls-remote"), "{error}");
    assert!(delivery_id_headers(ScmType::Git).is_empty());
}
