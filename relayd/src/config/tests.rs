//! The configuration file: what is accepted, what is refused, and why.
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    toml::from_str::<ConfigFile>(text).map_err(|e| ConfigError::Invalid(e.to_string()))?.resolve()
}

#[test]
fn empty_file_gives_the_defaults() {
    let c = parse("").expect("valid");
    assert_eq!(c.listen.port(), 8080);
    assert_eq!(c.first_byte_timeout, Duration::from_secs(300));
}

#[test]
fn unknown_keys_are_refused() {
    assert!(parse("lisen = \"127.0.0.1:1\"").is_err());
}

#[test]
fn users_need_a_valid_id_and_a_long_enough_token() {
    assert!(parse("[[users]]\nid = \"a/b\"\nagent_token = \"0123456789abcdef\"").is_err());
    assert!(parse("[[users]]\nid = \"alice\"\nagent_token = \"short\"").is_err());
    assert!(parse("[[users]]\nid = \"alice\"").is_err());
    let c = parse("[[users]]\nid = \"alice\"\nagent_token = \"0123456789abcdef\"").expect("valid");
    assert_eq!(c.users[0].id, "alice");
    // Shapes that are read as a credential or a JWT could never match.
    for token in ["tcred_0123456789abcdef", "aaaaaa.bbbbbbbb.cccccc", "with space 0123456789"] {
        let err = parse(&format!("[[users]]\nid = \"alice\"\nagent_token = \"{token}\""))
            .expect_err(token);
        assert!(err.to_string().contains("agent_token"), "{err}");
    }
}

#[test]
fn the_example_configuration_parses() {
    let text = include_str!("../../../packaging/relayd.toml");
    let file: ConfigFile = toml::from_str(text).expect("packaging/relayd.toml is valid");
    assert!(file.users.is_empty(), "the shipped file names no user");
    // As shipped (the package's conffile), relayd starts: nothing in it
    // points at a file that does not exist.
    file.resolve().expect("the shipped relayd.toml resolves");
    // Every commented-out knob is a real key with a valid value.
    let uncommented = daemon::config::uncomment_example(
        text,
        &["agent_token", "client_token", "max_streams_per_agent"],
    );
    toml::from_str::<ConfigFile>(&uncommented).expect("every documented knob is accepted");
}

#[test]
fn one_secret_for_two_users_or_two_roles_is_refused() {
    let err = parse(
        "[[users]]\nid = \"alice\"\nagent_token = \"0123456789abcdef\"\n\
         [[users]]\nid = \"bob\"\nagent_token = \"0123456789abcdef\"\n",
    )
    .expect_err("shared agent token");
    assert!(
        err.to_string()
            .contains("user \"bob\"'s agent_token is the same as user \"alice\"'s agent_token"),
        "{err}"
    );
    let err = parse(
        "[[users]]\nid = \"alice\"\nagent_token = \"0123456789abcdef\"\nclient_token = \"0123456789abcdef\"\n",
    )
    .expect_err("one token, two roles");
    assert!(
        err.to_string().contains("client_token is the same as user \"alice\"'s agent_token"),
        "{err}"
    );
    let err = parse(
        "[[users]]\nid = \"alice\"\nagent_token = \"0123456789abcdef\"\nclient_token = \"fedcba9876543210\"\n\
         [[users]]\nid = \"bob\"\nagent_token = \"fedcba9876543210\"\n",
    )
    .expect_err("alice's client token is bob's agent token");
    assert!(err.to_string().contains("bob"), "{err}");
}

#[test]
fn proxies_methods_and_header_limits_are_checked() {
    let c = parse(
        "[proxy]\ntrusted = [\"10.0.0.0/8\", \"::1\"]\n[http]\nextra_methods = [\"PROPFIND\"]\n[limits]\nmax_headers = 64\n",
    )
    .expect("valid");
    assert_eq!(c.trusted_proxies.0.len(), 2);
    assert_eq!(c.extra_methods, ["PROPFIND"]);
    assert_eq!(c.limits.max_headers, 64);
    assert!(!c.forward_cookies);
    assert!(parse("[proxy]\ntrusted = [\"10.0.0.0/40\"]").is_err());
    let err = parse("[http]\nextra_methods = [\"CONNECT\"]").expect_err("never");
    assert!(err.to_string().contains("cannot cross the tunnel"), "{err}");
    assert!(parse("[http]\nextra_methods = [\"get me\"]").is_err());
}

#[test]
fn the_old_name_of_max_streams_still_works_but_not_beside_the_new_one() {
    assert_eq!(parse("[limits]\nmax_streams_per_agent = 7").expect("valid").limits.max_streams, 7);
    assert_eq!(parse("[limits]\nmax_streams = 9").expect("valid").limits.max_streams, 9);
    let err = parse("[limits]\nmax_streams = 9\nmax_streams_per_agent = 7").expect_err("both");
    assert!(err.to_string().contains("old name of max_streams"), "{err}");
}

#[test]
fn tls_needs_both_files() {
    let err = parse("[tls]\ncert_file = \"/x/cert.pem\"\n").expect_err("must fail");
    assert!(err.to_string().contains("both cert_file and key_file"), "{err}");
    let err = parse("[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/x/k.pem\"\n")
        .expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    assert!(parse("[tls]\n").expect("valid").tls.is_none());
}

#[test]
fn route_timeouts_override_by_longest_prefix() {
    let c = parse(
        "[timeouts]\nidle = \"1m\"\ntotal = \"off\"\n\
         [[timeouts.route]]\nprefix = \"/api\"\nfirst_byte = \"1m\"\n\
         [[timeouts.route]]\nprefix = \"/api/pull\"\nidle = \"off\"\ntotal = \"2h\"\n",
    )
    .expect("valid");
    let pull = c.timeouts_for("/api/pull");
    assert_eq!(pull.idle, None);
    assert_eq!(pull.total, Some(Duration::from_secs(7200)));
    assert_eq!(pull.first_byte, Duration::from_secs(300));
    let chat = c.timeouts_for("/api/chat");
    assert_eq!(chat.first_byte, Duration::from_secs(60));
    assert_eq!(chat.idle, Some(Duration::from_secs(60)));
    assert_eq!(c.timeouts_for("/v1/models").total, None);
    assert!(parse("[timeouts]\nidle = \"0s\"").is_err());
    assert!(parse("[[timeouts.route]]\nprefix = \"api\"").is_err());
}

#[test]
fn durations_are_human_readable() {
    let c = parse("[timeouts]\nfirst_byte = \"2m 30s\"").expect("valid");
    assert_eq!(c.first_byte_timeout, Duration::from_secs(150));
    assert!(parse("[timeouts]\nfirst_byte = \"soon\"").is_err());
}

#[test]
fn the_ack_timeout_has_a_floor_of_one_second() {
    assert_eq!(parse("").expect("valid").ack_timeout, Duration::from_secs(30));
    assert_eq!(parse("[timeouts]\nack = \"1s\"").expect("valid").ack_timeout, ACK_FLOOR);
    let err = parse("[timeouts]\nack = \"500ms\"").expect_err("below the floor");
    assert!(err.to_string().contains("at least"), "{err}");
}

#[test]
fn a_device_limit_of_zero_is_refused_and_the_default_is_eight() {
    let err = parse("[limits]\nmax_devices_per_user = 0\n").expect_err("zero devices");
    assert!(err.to_string().contains("max_devices_per_user must be at least 1"), "{err}");
    assert_eq!(parse("").expect("no limits").max_devices_per_user, 8);
    assert_eq!(parse("[limits]\nmax_devices_per_user = 2\n").expect("two").max_devices_per_user, 2);
}

#[test]
fn replicas_must_be_given_the_keys_they_share() {
    let dir = std::env::temp_dir().join(format!("relayd-cluster-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("signing.pem");
    let _ = std::fs::remove_file(&key);
    crate::admin::generate_key(&key).expect("a signing key");
    let hash = dir.join("hash.key");
    std::fs::write(&hash, [1u8; 32]).expect("hash key");
    std::fs::set_permissions(&hash, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("0600");
    let cluster = "[cluster]\ndatabase = \"host=127.0.0.1 user=relayd\"\n";
    let err = parse(cluster).expect_err("no signing key");
    assert!(err.to_string().contains("signing_key_file"), "{err}");
    let signing = format!("[identity]\nsigning_key_file = \"{}\"\n", key.display());
    let err = parse(&format!("{signing}{cluster}")).expect_err("no user-hash key");
    assert!(err.to_string().contains("user_hash_key_file"), "{err}");
    let both = format!("{signing}user_hash_key_file = \"{}\"\n{cluster}", hash.display());
    let c = parse(&both).expect("a replica with both keys");
    assert_eq!(c.cluster.expect("a cluster").shown, "relayd@127.0.0.1:5432/relayd");
    let _ = std::fs::remove_dir_all(dir);
}
