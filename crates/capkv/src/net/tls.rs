//! Certificates and TLS: the cluster CA and node certificates (`capkv certs init`), mutual
//! TLS between peers, and TLS for the HTTP API.
//!
//! A certificate directory holds:
//!
//! ```text
//!   ca.pem, ca.key       the cluster CA (the key signs node certificates; keep it offline
//!                        once every node has its certificate)
//!   <node>.pem, .key     one per node: the certificate names the node (DNS name = its id,
//!                        e.g. `n2`), is signed by the CA, and serves as both the server and
//!                        the client certificate of the node's peer connections
//!   root.token           a random token for `serve --root-token-file` (the root user)
//! ```
//!
//! Peer identity: a dialer checks that the peer's certificate names the node it dialed; an
//! acceptor requires a client certificate signed by the CA, and checks that it names the
//! node the connection's hello claims before it reads any other frame
//! ([`PeerTls::check_identity`]). A certificate for `n3` cannot speak as `n2`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::PeerId;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const CA_NAME: &str = "capkv cluster CA";
/// The root user's token (`serve --root-token-file`), made with the CA.
pub const ROOT_TOKEN: &str = "root.token";
/// How long a certificate made by `certs init` is valid.
const VALID_YEARS: i32 = 10;

/// ring: it builds with a C compiler alone (aws-lc-rs, rustls's default, needs cmake). Its
/// provider is deprecated only for lacking post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn cert_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.pem"))
}

pub fn key_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.key"))
}

pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join(CA_CERT)
}

fn current_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn ca_params() -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut p);
    Ok(p)
}

/// From the start of last year to [`VALID_YEARS`] from now.
fn set_validity(p: &mut CertificateParams) {
    let year = current_year();
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

/// Writes `contents` to `path`, readable by its owner only when `secret`; never replaces
/// an existing file.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `capkv certs init DIR --nodes n1,n2,n3`: a CA (made once, then reused from DIR) and a
/// certificate and key for every node that has none yet. `extra_names` are added to every
/// new node certificate (e.g. `localhost`, `127.0.0.1`, so that the same certificate can
/// serve HTTPS). Returns the files written.
pub fn init_certs(
    dir: &Path,
    nodes: &[String],
    extra_names: &[String],
) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let (ca_key, ca_cert) = if ca_path(dir).exists() {
        let key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)
            .map_err(|e| format!("{}: {e}", dir.join(CA_KEY).display()))?;
        // The same name and key as the CA on disk: what it signs verifies against it.
        let cert = ca_params()?.self_signed(&key).map_err(|e| e.to_string())?;
        (key, cert)
    } else {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = ca_params()?.self_signed(&key).map_err(|e| e.to_string())?;
        write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
        write_new(&ca_path(dir), &cert.pem(), false)?;
        written.extend([dir.join(CA_KEY), ca_path(dir)]);
        (key, cert)
    };
    let token = dir.join(ROOT_TOKEN);
    if !token.exists() {
        let t = crate::auth::new_token().map_err(|e| e.message)?;
        write_new(&token, &format!("{t}\n"), true)?;
        written.push(token);
    }
    for node in nodes {
        crate::config::raft_id(node).map_err(|e| e.to_string())?;
        if cert_path(dir, node).exists() {
            continue;
        }
        let mut names = vec![node.clone()];
        names.extend(extra_names.iter().cloned());
        let mut p = CertificateParams::new(names).map_err(|e| format!("{node}: {e}"))?;
        p.distinguished_name.push(DnType::CommonName, node.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut p);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = p
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| format!("{node}: {e}"))?;
        write_new(&key_path(dir, node), &key.serialize_pem(), true)?;
        write_new(&cert_path(dir, node), &cert.pem(), false)?;
        written.extend([key_path(dir, node), cert_path(dir, node)]);
    }
    Ok(written)
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn roots(ca: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Mutual TLS for the peer transport: this node's certificate, the cluster CA, and the
/// name each peer's certificate must carry.
pub struct PeerTls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    /// Checks that a peer's certificate (already verified as CA-signed by the handshake)
    /// names the node the peer claims to be.
    names_check: Arc<WebPkiServerVerifier>,
    names: BTreeMap<PeerId, ServerName<'static>>,
}

impl PeerTls {
    /// Loads `dir/ca.pem`, `dir/<me>.pem` and `dir/<me>.key`; `peers` names every other
    /// node by id.
    pub fn load(dir: &Path, me: &str, peers: &BTreeMap<PeerId, String>) -> Result<PeerTls, String> {
        let roots = roots(&ca_path(dir))?;
        let chain = load_certs(&cert_path(dir, me))?;
        let key = load_key(&key_path(dir, me))?;
        let versions = &[&rustls::version::TLS13];
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("peer client verifier: {e}"))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("{}: {e}", cert_path(dir, me).display()))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("{}: {e}", cert_path(dir, me).display()))?;
        let names_check = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| format!("peer name verifier: {e}"))?;
        let names = peers
            .iter()
            .map(|(id, name)| {
                ServerName::try_from(name.clone())
                    .map(|n| (*id, n))
                    .map_err(|e| format!("node id '{name}' is not a certificate name: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(PeerTls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            names_check,
            names,
        })
    }

    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The name `peer`'s certificate must carry.
    pub fn name(&self, peer: PeerId) -> Option<ServerName<'static>> {
        self.names.get(&peer).cloned()
    }

    /// Whether `chain` (the peer's certificates, end entity first) names node `claimed`.
    pub fn check_identity(
        &self,
        chain: &[CertificateDer<'_>],
        claimed: PeerId,
    ) -> Result<(), String> {
        let name = self
            .name(claimed)
            .ok_or_else(|| format!("node {claimed} is not a member"))?;
        let (end, intermediates) = chain
            .split_first()
            .ok_or("the peer presented no certificate")?;
        self.names_check
            .verify_server_cert(end, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("its certificate does not name {name:?}: {e}"))
    }
}

/// TLS for the HTTP API: `cert`/`key` as given; with `client_ca`, every client must
/// present a certificate signed by it.
pub fn http_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| format!("client verifier: {e}"))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_once_and_a_certificate_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<String> = ["n1", "n2"].map(String::from).to_vec();
        let first = init_certs(dir.path(), &nodes, &[]).unwrap();
        assert_eq!(first.len(), 7);
        let ca = std::fs::read(ca_path(dir.path())).unwrap();
        // Again, with one more node: the CA and the existing certificates stay.
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let second = init_certs(dir.path(), &nodes, &[]).unwrap();
        assert_eq!(
            second,
            vec![key_path(dir.path(), "n3"), cert_path(dir.path(), "n3")]
        );
        assert_eq!(std::fs::read(ca_path(dir.path())).unwrap(), ca);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_path(dir.path(), "n3"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");
        // n3's certificate, signed by the reloaded CA, names n3 and only n3.
        let peers = BTreeMap::from([(1, "n1".to_string()), (3, "n3".to_string())]);
        let tls = PeerTls::load(dir.path(), "n2", &peers).unwrap();
        let n3 = load_certs(&cert_path(dir.path(), "n3")).unwrap();
        tls.check_identity(&n3, 3).unwrap();
        assert!(tls.check_identity(&n3, 1).is_err());
        assert!(tls.check_identity(&n3, 7).is_err());
        assert!(init_certs(dir.path(), &["bad name".into()], &[]).is_err());
    }

    #[test]
    fn a_certificate_from_another_ca_names_nobody() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        init_certs(ours.path(), &["n1".into(), "n2".into()], &[]).unwrap();
        init_certs(theirs.path(), &["n2".into()], &[]).unwrap();
        let peers = BTreeMap::from([(2, "n2".to_string())]);
        let tls = PeerTls::load(ours.path(), "n1", &peers).unwrap();
        let forged = load_certs(&cert_path(theirs.path(), "n2")).unwrap();
        assert!(tls.check_identity(&forged, 2).is_err());
    }
}
