//! Clients of the servers under test: mutual-TLS gRPC channels with the dev identities or with
//! certificates a test issued, and builders of the requests the suites send.

use std::time::Duration;

use piiguard::pb::admin_client::AdminClient;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::erasure_client::ErasureClient;
use piiguard::setup::pki::{Ca, ClientName, Issued};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::bao::TestEnv;
use super::server::Server;

impl TestEnv {
    /// The dev CA (it issues the test's own client certificates).
    pub fn ca(&self) -> Ca {
        Ca::load_dir(&self.pki.dir).unwrap()
    }

    /// The PEM certificate and key of one of the default dev identities.
    fn identity_pem(&self, stem: &str) -> (String, String) {
        let (c, k) = self.pki.client(stem);
        (
            std::fs::read_to_string(c).unwrap(),
            std::fs::read_to_string(k).unwrap(),
        )
    }

    /// A client with one of the default dev identities.
    pub async fn client(&self, server: &Server, stem: &str) -> CryptoClient<Channel> {
        CryptoClient::new(self.channel(server, stem).await)
    }

    /// An mTLS channel with one of the default dev identities.
    pub async fn channel(&self, server: &Server, stem: &str) -> Channel {
        let (cert, key) = self.identity_pem(stem);
        server.channel(Some((&cert, &key))).await.expect("connect")
    }

    /// A client with the dev `orders` identity whose connection may fail (a server that is
    /// stopping): the error as text instead of a panic.
    pub async fn client_probe(&self, server: &Server) -> Result<CryptoClient<Channel>, String> {
        let (cert, key) = self.identity_pem("orders");
        server
            .client_with(Some((&cert, &key)))
            .await
            .map_err(|e| e.to_string())
    }

    /// An Erasure client with the dev `erasure` identity.
    pub async fn erasure(&self, server: &Server) -> ErasureClient<Channel> {
        ErasureClient::new(self.channel(server, "erasure").await)
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// An Admin client with one of the default dev identities.
    pub async fn admin(&self, server: &Server, stem: &str) -> AdminClient<Channel> {
        let (cert, key) = self.identity_pem(stem);
        AdminClient::new(server.channel(Some((&cert, &key))).await.unwrap())
    }
}

impl Server {
    /// A channel presenting the given PEM certificate and key (or none).
    pub async fn channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read_to_string(&self.ca).unwrap();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        let ch = Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect()
            .await?;
        Ok(ch)
    }

    /// A client presenting the given PEM certificate and key (or none).
    pub async fn client_with(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<CryptoClient<Channel>, tonic::transport::Error> {
        Ok(CryptoClient::new(self.channel(identity).await?))
    }

    /// A client presenting a certificate the test issued.
    pub async fn client_issued(
        &self,
        issued: &Issued,
    ) -> Result<CryptoClient<Channel>, tonic::transport::Error> {
        self.client_with(Some((&issued.cert_pem, &issued.key_pem)))
            .await
    }
}

/// The SPIFFE client name `spiffe://shop.local/NAME`.
pub fn spiffe(name: &str) -> ClientName {
    ClientName::Spiffe(format!("spiffe://shop.local/{name}"))
}

/// The ErrorInfo reason of a status.
pub fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("<no ErrorInfo: {:?} {}>", s.code(), s.message()))
}

/// An EncryptRequest without context, raw encoding.
pub fn enc(keyspace: &str, subject: &str, field: &str, pt: &[u8]) -> piiguard::pb::EncryptRequest {
    piiguard::pb::EncryptRequest {
        keyspace: keyspace.into(),
        subject: subject.into(),
        field: field.into(),
        plaintext: pt.to_vec(),
        context: Default::default(),
        encoding: 0,
        blind_index: false,
    }
}

/// A DecryptRequest without context, any keyspace.
pub fn dec(field: &str, ct: &[u8]) -> piiguard::pb::DecryptRequest {
    piiguard::pb::DecryptRequest {
        field: field.into(),
        ciphertext: ct.to_vec(),
        context: Default::default(),
        keyspace: String::new(),
        reveal: 0,
    }
}
