//! LDAP logins against a real OpenLDAP `slapd` (see `shoal_auth::testing`).

use shoal_auth::ldap::{BindMode, Directory, GroupLookup, LdapConfig, LdapError};
use shoal_auth::role::{Role, RoleMapping};
use shoal_auth::testing::{self, Slapd};
use shoal_types::{AccountId, CacheId};

const INJECTIONS: &[&str] =
    &["*)(uid=*))(|(uid=*", "admin)(|(objectClass=*)", "*", "alice)(uid=*", "alice\0"];

fn base_config(url: String) -> LdapConfig {
    LdapConfig {
        url,
        starttls: false,
        allow_plaintext: true,
        ca_cert: None,
        mode: BindMode::Bind { dn_template: testing::PEOPLE_TEMPLATE.into() },
        groups: GroupLookup::MemberOf,
        roles: Vec::new(),
        connect_timeout_ms: 1000,
        operation_timeout_ms: 2000,
        pool_size: 2,
        max_concurrent_logins: 4,
    }
}

fn search_mode() -> BindMode {
    BindMode::Search {
        bind_dn: testing::SERVICE_DN.into(),
        bind_password: testing::SERVICE_PW.into(),
        base: testing::BASE.into(),
        filter: "(&(objectClass=inetOrgPerson)(uid={user}))".into(),
    }
}

fn bind_dir(slapd: &Slapd) -> Directory {
    Directory::new(base_config(slapd.url())).unwrap()
}

fn search_dir(slapd: &Slapd) -> Directory {
    Directory::new(LdapConfig { mode: search_mode(), ..base_config(slapd.url()) }).unwrap()
}

fn group(cn: &str) -> String {
    format!("cn={cn},{}", testing::GROUPS_BASE)
}

#[tokio::test]
async fn good_login_in_bind_mode() {
    let slapd = Slapd::start();
    let id = bind_dir(&slapd).authenticate("alice", "alice-pw").await.unwrap();
    assert_eq!(id.dn, "uid=alice,ou=people,dc=example,dc=org");
    assert_eq!(id.user, "alice");
    let mut groups = id.groups.clone();
    groups.sort();
    assert_eq!(groups, [group("admins"), group("cache-rw")]);
    // A comma in the user name is DN-escaped, so it names the right entry.
    let id = bind_dir(&slapd).authenticate("smith, john", "smith-pw").await.unwrap();
    assert_eq!(id.groups, [group("owners")]);
}

#[tokio::test]
async fn good_login_in_search_mode() {
    let slapd = Slapd::start();
    let dir = search_dir(&slapd);
    let id = dir.authenticate("bob", "bob-pw").await.unwrap();
    assert_eq!(id.dn, "uid=bob,ou=people,dc=example,dc=org");
    let mut groups = id.groups.clone();
    groups.sort();
    assert_eq!(groups, [group("auditors"), group("cache-ro")]);
    let id = dir.authenticate("smith, john", "smith-pw").await.unwrap();
    assert_eq!(id.dn, "uid=smith\\2C john,ou=people,dc=example,dc=org");
    // The service account's connection went back to the pool and is reused.
    assert_eq!(dir.idle_connections(), 1);
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused() {
    let slapd = Slapd::start();
    let bind = bind_dir(&slapd);
    let search = search_dir(&slapd);
    assert!(matches!(bind.authenticate("alice", "bob-pw").await, Err(LdapError::InvalidCredentials)));
    assert!(matches!(search.authenticate("alice", "bob-pw").await, Err(LdapError::InvalidCredentials)));
    assert!(matches!(bind.authenticate("mallory", "x").await, Err(LdapError::InvalidCredentials)));
    assert!(matches!(search.authenticate("mallory", "x").await, Err(LdapError::UnknownUser)));
    // The service account's own password does not log anyone in as a user.
    assert!(matches!(search.authenticate("reader", testing::SERVICE_PW).await, Err(LdapError::UnknownUser)));
    // Clients are told the same thing either way.
    let a = bind.authenticate("alice", "nope").await.unwrap_err();
    let b = search.authenticate("mallory", "nope").await.unwrap_err();
    assert_eq!(a.client_message(), b.client_message());
    assert!(a.is_credential_failure() && b.is_credential_failure());
}

#[tokio::test]
async fn empty_passwords_never_reach_the_directory() {
    let slapd = Slapd::start();
    // This directory (like AD) accepts an unauthenticated bind: a DN and no password.
    let (conn, mut raw) = ldap3::LdapConnAsync::new(&slapd.url()).await.unwrap();
    ldap3::drive!(conn);
    let anon = raw.simple_bind("uid=alice,ou=people,dc=example,dc=org", "").await.unwrap();
    assert_eq!(anon.rc, 0, "slapd should accept the unauthenticated bind: {anon:?}");
    // So it must be refused by us, for every user, in both modes.
    for dir in [bind_dir(&slapd), search_dir(&slapd)] {
        for user in ["alice", "mallory"] {
            assert!(matches!(dir.authenticate(user, "").await, Err(LdapError::EmptyPassword)));
        }
    }
}

#[tokio::test]
async fn injection_attempts_match_nobody() {
    let slapd = Slapd::start();
    let search = search_dir(&slapd);
    let bind = bind_dir(&slapd);
    for user in INJECTIONS {
        for password in ["alice-pw", "x"] {
            let s = search.authenticate(user, password).await;
            assert!(
                matches!(s, Err(LdapError::UnknownUser) | Err(LdapError::InvalidInput(_))),
                "search mode, {user:?}: {s:?}"
            );
            let b = bind.authenticate(user, password).await;
            assert!(
                matches!(b, Err(LdapError::InvalidCredentials) | Err(LdapError::InvalidInput(_))),
                "bind mode, {user:?}: {b:?}"
            );
        }
    }
    // A DN-injection attempt in bind mode cannot move the bind to another entry.
    let b = bind.authenticate("alice,ou=people,dc=example,dc=org", "alice-pw").await;
    assert!(matches!(b, Err(LdapError::InvalidCredentials)), "{b:?}");
    // NUL in the user name or password is refused outright.
    assert!(matches!(search.authenticate("alice\0", "alice-pw").await, Err(LdapError::InvalidInput(_))));
    assert!(matches!(search.authenticate("alice", "alice-pw\0").await, Err(LdapError::InvalidInput(_))));
}

#[tokio::test]
async fn two_matching_entries_are_refused() {
    let slapd = Slapd::start();
    let dir = search_dir(&slapd);
    assert!(matches!(dir.authenticate("dup", "dup-pw").await, Err(LdapError::AmbiguousUser(2))));
    // A filter that matches many users ("*" is escaped, but a broad configured filter is not).
    let broad = BindMode::Search {
        bind_dn: testing::SERVICE_DN.into(),
        bind_password: testing::SERVICE_PW.into(),
        base: testing::BASE.into(),
        filter: "(|(uid={user})(objectClass=inetOrgPerson))".into(),
    };
    let dir = Directory::new(LdapConfig { mode: broad, ..base_config(slapd.url()) }).unwrap();
    assert!(matches!(dir.authenticate("alice", "alice-pw").await, Err(LdapError::AmbiguousUser(2))));
}

#[tokio::test]
async fn groups_map_to_roles() {
    let slapd = Slapd::start();
    let account = AccountId::parse("a00000000000a").unwrap();
    let rw = CacheId::parse("c000000000001").unwrap();
    let ro = CacheId::parse("c000000000002").unwrap();
    let roles = vec![
        RoleMapping { group: group("admins"), role: Role::PlatformAdmin },
        RoleMapping { group: group("auditors"), role: Role::Auditor { account: None } },
        // Spelled differently from the directory: still the same group.
        RoleMapping {
            group: "CN=Owners, OU=Groups, DC=example, DC=org".into(),
            role: Role::AccountOwner { account: account.clone() },
        },
        RoleMapping { group: group("cache-rw"), role: Role::CacheReadWrite { cache: rw.clone() } },
        RoleMapping { group: group("cache-ro"), role: Role::CacheReadOnly { cache: ro.clone() } },
    ];
    let group_search = GroupLookup::Search {
        base: testing::GROUPS_BASE.into(),
        filter: "(&(objectClass=groupOfNames)(member={dn}))".into(),
    };
    for (mode, groups) in [
        (BindMode::Bind { dn_template: testing::PEOPLE_TEMPLATE.into() }, GroupLookup::MemberOf),
        (search_mode(), GroupLookup::MemberOf),
        (BindMode::Bind { dn_template: testing::PEOPLE_TEMPLATE.into() }, group_search.clone()),
        (search_mode(), group_search.clone()),
    ] {
        let label = format!("{mode:?} {groups:?}");
        let config = LdapConfig { mode, groups, roles: roles.clone(), ..base_config(slapd.url()) };
        let dir = Directory::new(config).unwrap();
        let alice = dir.authenticate("alice", "alice-pw").await.unwrap();
        assert_eq!(alice.roles, [Role::PlatformAdmin, Role::CacheReadWrite { cache: rw.clone() }], "{label}");
        let bob = dir.authenticate("bob", "bob-pw").await.unwrap();
        assert_eq!(
            bob.roles,
            [Role::Auditor { account: None }, Role::CacheReadOnly { cache: ro.clone() }],
            "{label}"
        );
        let smith = dir.authenticate("smith, john", "smith-pw").await.unwrap();
        assert_eq!(smith.roles, [Role::AccountOwner { account: account.clone() }], "{label}");
        let carol = dir.authenticate("carol", "carol-pw").await.unwrap();
        assert!(carol.groups.is_empty() && carol.roles.is_empty(), "{label}");
    }
}

#[tokio::test]
async fn directory_down_is_unavailable_then_recovers() {
    let mut slapd = Slapd::start();
    let search = search_dir(&slapd);
    let bind = bind_dir(&slapd);
    search.authenticate("alice", "alice-pw").await.unwrap();
    assert_eq!(search.idle_connections(), 1);

    slapd.stop();
    for dir in [&search, &bind] {
        let err = dir.authenticate("alice", "alice-pw").await.unwrap_err();
        assert!(matches!(err, LdapError::Unavailable(_)), "{err:?}");
        assert!(!err.is_credential_failure());
        assert!(err.client_message().contains("unavailable"));
    }

    slapd.restart();
    // The pooled connection died with the old slapd; the next login gets a fresh one.
    search.authenticate("alice", "alice-pw").await.unwrap();
    bind.authenticate("alice", "alice-pw").await.unwrap();
    assert!(matches!(search.authenticate("alice", "wrong").await, Err(LdapError::InvalidCredentials)));
}

#[tokio::test]
async fn a_hanging_directory_times_out_as_unavailable() {
    // Accepts TCP connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ldap://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = LdapConfig { mode: search_mode(), operation_timeout_ms: 300, ..base_config(url) };
    let dir = Directory::new(config).unwrap();
    let started = std::time::Instant::now();
    let err = dir.authenticate("alice", "alice-pw").await.unwrap_err();
    assert!(matches!(err, LdapError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test]
async fn starttls_and_ldaps_verify_the_server_certificate() {
    let slapd = Slapd::start();
    let tls = |url: String, starttls: bool, ca: std::path::PathBuf| LdapConfig {
        starttls,
        allow_plaintext: false,
        ca_cert: Some(ca),
        mode: search_mode(),
        ..base_config(url)
    };
    for (url, starttls) in [(slapd.url(), true), (slapd.ldaps_url(), false)] {
        let good = Directory::new(tls(url.clone(), starttls, slapd.ca_path())).unwrap();
        let id = good.authenticate("alice", "alice-pw").await.unwrap();
        assert_eq!(id.dn, "uid=alice,ou=people,dc=example,dc=org", "{url}");
        assert!(matches!(good.authenticate("alice", "x").await, Err(LdapError::InvalidCredentials)));

        let wrong = Directory::new(tls(url.clone(), starttls, slapd.wrong_ca_path())).unwrap();
        let err = wrong.authenticate("alice", "alice-pw").await.unwrap_err();
        assert!(matches!(err, LdapError::Unavailable(_)), "{url}: {err:?}");
        assert!(err.to_string().to_lowercase().contains("certificate"), "{url}: {err}");
    }
    // Bind mode over TLS too (the user's own connection is a TLS connection).
    let config = LdapConfig {
        mode: BindMode::Bind { dn_template: testing::PEOPLE_TEMPLATE.into() },
        ..tls(slapd.ldaps_url(), false, slapd.ca_path())
    };
    Directory::new(config).unwrap().authenticate("bob", "bob-pw").await.unwrap();
}

#[tokio::test]
async fn a_refused_service_account_is_a_directory_error_not_a_bad_login() {
    let slapd = Slapd::start();
    let mode = BindMode::Search {
        bind_dn: testing::SERVICE_DN.into(),
        bind_password: "not-the-password".into(),
        base: testing::BASE.into(),
        filter: "(uid={user})".into(),
    };
    let dir = Directory::new(LdapConfig { mode, ..base_config(slapd.url()) }).unwrap();
    let err = dir.authenticate("alice", "alice-pw").await.unwrap_err();
    assert!(matches!(err, LdapError::Directory(_)), "{err:?}");
    assert!(!err.is_credential_failure());
}

#[tokio::test]
async fn the_pool_stays_bounded_under_concurrent_logins() {
    let slapd = Slapd::start();
    let config = LdapConfig {
        mode: search_mode(),
        pool_size: 1,
        max_concurrent_logins: 2,
        ..base_config(slapd.url())
    };
    let dir = Directory::new(config).unwrap();
    let logins = (0..20).map(|i| {
        let dir = dir.clone();
        tokio::spawn(async move {
            let (user, pw) = if i % 2 == 0 { ("alice", "alice-pw") } else { ("bob", "bob-pw") };
            dir.authenticate(user, pw).await
        })
    });
    for login in logins {
        login.await.unwrap().unwrap();
    }
    // One service connection and two user binds at a time: the logins queued and all worked.
    assert_eq!(dir.idle_connections(), 1);
}
