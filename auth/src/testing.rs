//! A real OpenLDAP `slapd` for tests (feature `testing`): started on free ports with a
//! temporary `slapd.conf`, a test CA and a seeded directory. Nothing outside a temporary
//! directory is written; the system's schema files are only read.
//!
//! Needs Debian's `slapd` and `ldap-utils` (`scripts/setup.sh --test`).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory's suffix.
pub const BASE: &str = "dc=example,dc=org";
/// The root DN (may write everything) and its password.
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
pub const ROOT_PW: &str = "root-secret";
/// The read-only service account used by search+bind mode.
pub const SERVICE_DN: &str = "cn=reader,dc=example,dc=org";
pub const SERVICE_PW: &str = "reader-secret";
/// `uid={user},ou=people,dc=example,dc=org`.
pub const PEOPLE_TEMPLATE: &str = "uid={user},ou=people,dc=example,dc=org";
/// Groups live here.
pub const GROUPS_BASE: &str = "ou=groups,dc=example,dc=org";

/// The seeded entries. Users (password = `<uid>-pw`):
/// - `alice`: in `cn=admins` and `cn=cache-rw`
/// - `bob`: in `cn=auditors` and `cn=cache-ro`
/// - `carol`: in no group
/// - `smith, john` (a comma in the RDN value, password `smith-pw`): in `cn=owners`
/// - `dup`: two entries, one in `ou=people` and one in `ou=contractors`
pub const SEED_LDIF: &str = r"dn: dc=example,dc=org
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: cn=reader,dc=example,dc=org
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: reader-secret

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=contractors,dc=example,dc=org
objectClass: organizationalUnit
ou: contractors

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: uid=alice,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: Liddell
userPassword: alice-pw

dn: uid=bob,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: Builder
userPassword: bob-pw

dn: uid=carol,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: Singer
userPassword: carol-pw

dn: uid=smith\2C john,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: smith, john
cn: John Smith
sn: Smith
userPassword: smith-pw

dn: uid=dup,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: dup
cn: Dup One
sn: One
userPassword: dup-pw

dn: uid=dup,ou=contractors,dc=example,dc=org
objectClass: inetOrgPerson
uid: dup
cn: Dup Two
sn: Two
userPassword: dup-pw

dn: cn=admins,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: admins
member: uid=alice,ou=people,dc=example,dc=org

dn: cn=auditors,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: auditors
member: uid=bob,ou=people,dc=example,dc=org

dn: cn=cache-rw,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: cache-rw
member: uid=alice,ou=people,dc=example,dc=org

dn: cn=cache-ro,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: cache-ro
member: uid=bob,ou=people,dc=example,dc=org

dn: cn=owners,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: owners
member: uid=smith\2C john,ou=people,dc=example,dc=org
";

/// A running `slapd` with a plain (`ldap://`, StartTLS-capable) and an `ldaps://` listener.
/// Killed when dropped.
pub struct Slapd {
    dir: tempfile::TempDir,
    port: u16,
    tls_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where Debian installs `slapd`.
fn slapd_binary() -> PathBuf {
    for p in ["/usr/sbin/slapd", "/usr/local/libexec/slapd"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("slapd not found: run scripts/setup.sh --test (apt-get install slapd ldap-utils)");
}

impl Slapd {
    /// Starts slapd with the seeded directory and waits until it answers.
    pub fn start() -> Slapd {
        let dir = tempfile::Builder::new().prefix("shoal-slapd").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        write_certificates(dir.path());
        let mut slapd = Slapd { port: free_port(), tls_port: free_port(), child: None, dir };
        std::fs::write(slapd.dir.path().join("slapd.conf"), slapd.config()).unwrap();
        slapd.restart();
        slapd.add_ldif(SEED_LDIF);
        slapd
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        format!(
            r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
# Like Active Directory: a bind with a DN and an empty password "succeeds" as anonymous
# (RFC 4513 §5.1.2), so tests show that such a bind is never taken as a login.
allow bind_anon_dn
TLSCACertificateFile {d}/ca.pem
TLSCertificateFile {d}/server.pem
TLSCertificateKeyFile {d}/server.key
database mdb
suffix "{BASE}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {d}/db
maxsize 16777216
overlay memberof
access to attrs=userPassword
  by anonymous auth
  by * none
access to *
  by users read
  by * none
"#
        )
    }

    /// `ldap://127.0.0.1:<port>` (plain, StartTLS available).
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:<port>` (TLS from the first byte; the certificate names
    /// `localhost` and `127.0.0.1`).
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.tls_port)
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The PEM file of another CA, which did not sign anything slapd presents.
    pub fn wrong_ca_path(&self) -> PathBuf {
        self.dir.path().join("wrong-ca.pem")
    }

    /// Adds entries as the root DN with `ldapadd`.
    pub fn add_ldif(&self, ldif: &str) {
        let path = self.dir.path().join("add.ldif");
        std::fs::write(&path, ldif).unwrap();
        let out = Command::new("ldapadd")
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW, "-f"])
            .arg(&path)
            .output()
            .expect("ldapadd (apt-get install ldap-utils)");
        assert!(out.status.success(), "ldapadd failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Kills slapd (SIGKILL, like a crash); the data stays for [`Slapd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts slapd on the same ports with the same data and waits until both ports answer.
    pub fn restart(&mut self) {
        self.stop();
        let urls = format!("ldap://127.0.0.1:{}/ ldaps://127.0.0.1:{}/", self.port, self.tls_port);
        let log = std::fs::File::create(self.dir.path().join("slapd.log")).unwrap();
        let child = Command::new(slapd_binary())
            .arg("-f")
            .arg(self.dir.path().join("slapd.conf"))
            .args(["-h", &urls, "-d", "none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start slapd");
        self.child = Some(child);
        let started = Instant::now();
        for port in [self.port, self.tls_port] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    let log = std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default();
                    panic!("slapd exited with {status}: {log}");
                }
                assert!(started.elapsed() < Duration::from_secs(10), "slapd did not listen within 10 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test CA, a server certificate it signs for `localhost` and `127.0.0.1`, and an
/// unrelated CA.
fn write_certificates(dir: &Path) {
    let (ca_params, ca_key) = ca("Shoal test CA");
    std::fs::write(dir.join("ca.pem"), ca_params.self_signed(&ca_key).unwrap().pem()).unwrap();
    let (wrong_params, wrong_key) = ca("Some other CA");
    std::fs::write(dir.join("wrong-ca.pem"), wrong_params.self_signed(&wrong_key).unwrap().pem()).unwrap();

    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params, key)
}
