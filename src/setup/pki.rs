//! Dev PKI: a CA, a server certificate for 127.0.0.1/localhost (used by piiguard and by the
//! dev OpenBao), and client certificates with SPIFFE URI SANs. Generated at run time into
//! `certs/dev/` by default (ignored by git); nothing here is ever committed. Not for production:
//! certs/README.md says how to issue real identities.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use super::SetupError;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Clients the dev PKI issues by default: file stem and SPIFFE identity.
pub const DEFAULT_CLIENTS: &[(&str, &str)] = &[
    ("orders", "spiffe://shop.local/orders"),
    ("shipping", "spiffe://shop.local/shipping"),
    ("erasure", "spiffe://shop.local/erasure"),
    ("admin", "spiffe://shop.local/admin"),
];

/// What a client certificate names.
#[derive(Debug, Clone)]
pub enum ClientName {
    /// A SPIFFE URI SAN.
    Spiffe(String),
    /// A DNS SAN.
    Dns(String),
    /// Only a subject common name.
    CommonName(String),
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM, zeroized on drop).
    pub key_pem: zeroize::Zeroizing<String>,
    /// Serial number (for CRLs).
    pub serial: Vec<u8>,
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn random_serial() -> Result<SerialNumber, SetupError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| "CSPRNG failed".to_string())?;
    b[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&b))
}

fn ca_params() -> Result<CertificateParams, SetupError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, "piiguard dev CA (not for production)");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(365);
    p.serial_number = Some(random_serial()?);
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// A CA able to issue certificates.
pub struct Ca {
    /// Certificate (PEM).
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA.
    pub fn generate() -> Result<(Self, zeroize::Zeroizing<String>), SetupError> {
        let key = KeyPair::generate().map_err(e)?;
        let params = ca_params()?;
        let cert = params.self_signed(&key).map_err(e)?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok((
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, SetupError> {
        let key = KeyPair::from_pem(key_pem).map_err(e)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(e)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// Loads a CA from `dir/ca.pem` and `dir/ca.key`.
    pub fn load_dir(dir: &Path) -> Result<Self, SetupError> {
        let c = std::fs::read_to_string(dir.join("ca.pem")).map_err(e)?;
        let k = zeroize::Zeroizing::new(std::fs::read_to_string(dir.join("ca.key")).map_err(e)?);
        Self::load(&c, &k)
    }

    /// A server certificate for 127.0.0.1, ::1 and localhost.
    pub fn issue_server(&self) -> Result<Issued, SetupError> {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.subject_alt_names
            .push(SanType::IpAddress("::1".parse().map_err(e)?));
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(
            p,
            OffsetDateTime::now_utc() - Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(90),
        )
    }

    /// A client certificate valid between the given times.
    pub fn issue_client(
        &self,
        name: &ClientName,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, SetupError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        match name {
            ClientName::Spiffe(u) => {
                p.subject_alt_names
                    .push(SanType::URI(u.as_str().try_into().map_err(e)?));
                p.distinguished_name.push(DnType::CommonName, u.as_str());
            }
            ClientName::Dns(d) => {
                p.subject_alt_names
                    .push(SanType::DnsName(d.as_str().try_into().map_err(e)?));
            }
            ClientName::CommonName(cn) => {
                p.distinguished_name.push(DnType::CommonName, cn.as_str())
            }
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p, not_before, not_after)
    }

    /// A client certificate valid for 90 days.
    pub fn issue_client_now(&self, name: &ClientName) -> Result<Issued, SetupError> {
        self.issue_client(
            name,
            OffsetDateTime::now_utc() - Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(90),
        )
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, SetupError> {
        let serial = random_serial()?;
        p.serial_number = Some(serial.clone());
        p.not_before = not_before;
        p.not_after = not_after;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(e)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(e)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL revoking the given serial numbers, valid for 7 days, PEM-encoded.
    pub fn crl(&self, revoked: &[Vec<u8>]) -> Result<String, SetupError> {
        let now = OffsetDateTime::now_utc();
        self.crl_between(revoked, now - Duration::minutes(5), now + Duration::days(7))
    }

    /// A CRL revoking the given serial numbers with the given `thisUpdate` and `nextUpdate`
    /// (a `nextUpdate` in the past makes an expired CRL), PEM-encoded.
    pub fn crl_between(
        &self,
        revoked: &[Vec<u8>],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, SetupError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: random_serial()?,
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: (now - Duration::minutes(1)).max(this_update),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params
            .signed_by(&self.issuer)
            .map_err(e)?
            .pem()
            .map_err(e)?)
    }
}

/// Writes a file; private keys get mode 0600.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), SetupError> {
    use std::io::Write as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(0o600);
    }
    let _ = private;
    let mut f = o
        .open(path)
        .map_err(|x| format!("{}: {x}", path.display()))?;
    f.write_all(contents)
        .map_err(|x| SetupError(format!("{}: {x}", path.display())))
}

/// Paths of a generated dev PKI.
#[derive(Debug, Clone)]
pub struct DevPkiPaths {
    /// The folder.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
}

impl DevPkiPaths {
    /// The paths of a dev PKI in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// Client certificate and key of a default client.
    pub fn client(&self, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("client-{stem}.pem")),
            self.dir.join(format!("client-{stem}.key")),
        )
    }
}

/// Generates the dev PKI into `dir` (created if needed). Existing files are replaced.
pub fn generate_dev_pki(dir: &Path, clients: &[(&str, &str)]) -> Result<DevPkiPaths, SetupError> {
    std::fs::create_dir_all(dir).map_err(|x| format!("{}: {x}", dir.display()))?;
    let paths = DevPkiPaths::new(dir);
    let (ca, ca_key) = Ca::generate()?;
    write_file(&paths.ca, ca.cert_pem.as_bytes(), false)?;
    write_file(&dir.join("ca.key"), ca_key.as_bytes(), true)?;
    let server = ca.issue_server()?;
    write_file(&paths.server_cert, server.cert_pem.as_bytes(), false)?;
    write_file(&paths.server_key, server.key_pem.as_bytes(), true)?;
    for (stem, spiffe) in clients {
        let c = ca.issue_client_now(&ClientName::Spiffe((*spiffe).to_string()))?;
        let (cp, kp) = paths.client(stem);
        write_file(&cp, c.cert_pem.as_bytes(), false)?;
        write_file(&kp, c.key_pem.as_bytes(), true)?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_read_in_priority_order_and_kinds_never_collide() {
        use crate::domain::identity::IdentityKind;
        use crate::tls::{NoIdentity, identity_of};
        let (ca, _) = Ca::generate().unwrap();
        let der = |i: &Issued| {
            rustls_pki_types::CertificateDer::from_pem_slice(i.cert_pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        use rustls_pki_types::pem::PemObject as _;
        let s = ca
            .issue_client_now(&ClientName::Spiffe("spiffe://shop.local/a".into()))
            .unwrap();
        let id = identity_of(&der(&s), false).unwrap();
        assert_eq!(id.as_str(), "spiffe://shop.local/a");
        assert_eq!(id.kind(), IdentityKind::Spiffe);
        let d = ca
            .issue_client_now(&ClientName::Dns("Svc.Shop".into()))
            .unwrap();
        assert_eq!(
            identity_of(&der(&d), false).unwrap().as_str(),
            "dns:svc.shop"
        );
        let c = ca
            .issue_client_now(&ClientName::CommonName("legacy".into()))
            .unwrap();
        // A CN is an identity only when the operator opted in, and then only as `cn:`.
        assert_eq!(identity_of(&der(&c), false), Err(NoIdentity::CnNotAllowed));
        assert_eq!(identity_of(&der(&c), true).unwrap().as_str(), "cn:legacy");
        // The finding: a CN that reads like a SPIFFE ID is never that SPIFFE ID.
        let forged = ca
            .issue_client_now(&ClientName::CommonName("spiffe://shop.local/admin".into()))
            .unwrap();
        assert_eq!(
            identity_of(&der(&forged), false),
            Err(NoIdentity::CnNotAllowed)
        );
        let id = identity_of(&der(&forged), true).unwrap();
        assert_eq!(id.as_str(), "cn:spiffe://shop.local/admin");
        assert_eq!(id.kind(), IdentityKind::Cn);
    }
}
