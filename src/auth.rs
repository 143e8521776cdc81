//! Authentication and authorization of data-listener requests.
//!
//! A principal authenticates with `Authorization: Bearer <token>` or, when `tls.client_ca` is
//! set, with a TLS client certificate that the CA issued (the handshake already refused any
//! other certificate). Only the SHA-256 of each token is configured. The presented token is
//! hashed and compared with every configured hash in constant time. The loop never exits early,
//! so timing reveals neither which token matched nor how much of it.
//!
//! Every principal has one role and a set of practices, and everything not granted is denied:
//!
//! | role | may |
//! |---|---|
//! | `ingest` | upload objects (`PUT`) |
//! | `reader` | read objects (`GET`, `HEAD`) and list a call's artifacts |
//! | `admin` | delete objects |
//! | `auditor` | query the audit log; never call data |
//!
//! Retell webhooks authenticate by their HMAC signature instead (see [`crate::webhook`]).

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::audit::{Action, PrincipalName, Role};
use crate::config::{Client, Token};
use crate::ids::PracticeId;

/// The identity a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's or client's configured name; safe to log and audit.
    pub name: PrincipalName,
    pub role: Role,
    pub practices: BTreeSet<PracticeId>,
}

/// The names a verified client certificate carries, read once per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateNames {
    pub subject_cn: Option<String>,
    pub dns_names: Vec<String>,
}

impl CertificateNames {
    /// Reads the subject common name and DNS subject alternative names of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<CertificateNames> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject_cn = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut dns_names = Vec::new();
        if let Ok(Some(names)) = certificate.subject_alternative_name() {
            for name in &names.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                    dns_names.push((*dns).to_owned());
                }
            }
        }
        Some(CertificateNames {
            subject_cn,
            dns_names,
        })
    }
}

/// Why a request was refused: 401 for [`AuthError::Unauthenticated`], 403 for
/// [`AuthError::Forbidden`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or invalid bearer token or client certificate")]
    Unauthenticated,
    #[error("the principal's role or practices do not allow this request")]
    Forbidden,
}

impl AuthError {
    /// The short reason recorded in the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated => "unauthenticated",
            AuthError::Forbidden => "forbidden",
        }
    }
}

/// Matches presented credentials against the configured tokens and client certificates.
pub struct Authenticator {
    tokens: Vec<(Principal, [u8; 32])>,
    clients: Vec<(Principal, Client)>,
}

impl Authenticator {
    /// Builds the authenticator; names that are not valid principal names are rejected by the
    /// configuration before this runs.
    pub fn new(tokens: &[Token], clients: &[Client]) -> Result<Self, crate::ids::InvalidId> {
        let tokens = tokens
            .iter()
            .map(|token| {
                let principal = Principal {
                    name: PrincipalName::new(token.name.clone())?,
                    role: token.role,
                    practices: token.practices.clone(),
                };
                Ok((principal, token.sha256))
            })
            .collect::<Result<_, crate::ids::InvalidId>>()?;
        let clients = clients
            .iter()
            .map(|client| {
                let principal = Principal {
                    name: PrincipalName::new(client.name.clone())?,
                    role: client.role,
                    practices: client.practices.clone(),
                };
                Ok((principal, client.clone()))
            })
            .collect::<Result<_, crate::ids::InvalidId>>()?;
        Ok(Authenticator { tokens, clients })
    }

    /// Finds the principal for a request: its bearer token if it sent an `Authorization` header,
    /// otherwise its verified client certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&CertificateNames>,
    ) -> Result<&Principal, AuthError> {
        match authorization {
            Some(value) => self.authenticate_token(value),
            None => certificate
                .and_then(|names| self.match_certificate(names))
                .ok_or(AuthError::Unauthenticated),
        }
    }

    fn authenticate_token(&self, authorization: &[u8]) -> Result<&Principal, AuthError> {
        let token = strip_bearer(authorization)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Unauthenticated)?;
        let presented: [u8; 32] = Sha256::digest(token).into();

        // Visit every configured hash and select the match without branching on secret data.
        let mut matched = subtle::CtOption::new(0u64, 0.into());
        for (index, (_, hash)) in self.tokens.iter().enumerate() {
            let equal = hash.ct_eq(&presented);
            let candidate = subtle::CtOption::new(index as u64, equal);
            matched = subtle::CtOption::conditional_select(&matched, &candidate, equal);
        }
        let index = Option::<u64>::from(matched).ok_or(AuthError::Unauthenticated)?;
        Ok(&self.tokens[index as usize].0)
    }

    /// Finds the first client whose configured names all match the certificate.
    fn match_certificate(&self, names: &CertificateNames) -> Option<&Principal> {
        self.clients.iter().find_map(|(principal, client)| {
            let cn_matches = client
                .subject_cn
                .as_ref()
                .is_none_or(|cn| names.subject_cn.as_ref() == Some(cn));
            let dns_matches = client
                .dns_name
                .as_ref()
                .is_none_or(|dns| names.dns_names.contains(dns));
            (cn_matches && dns_matches).then_some(principal)
        })
    }

    /// Checks that `principal`'s role grants `action` and that it may act on `practice`.
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        practice: &PracticeId,
    ) -> Result<(), AuthError> {
        if permits(principal.role, action) && principal.practices.contains(practice) {
            Ok(())
        } else {
            Err(AuthError::Forbidden)
        }
    }
}

/// Whether `role` grants `action`; the table in the module documentation.
pub fn permits(role: Role, action: Action) -> bool {
    matches!(
        (role, action),
        (Role::Ingest, Action::ObjectPut)
            | (
                Role::Reader,
                Action::ObjectGet | Action::ObjectHead | Action::CallList
            )
            | (Role::Admin, Action::ObjectDelete)
            | (Role::Auditor, Action::AuditQuery)
    )
}

/// Returns the token of a `Bearer` credential; the scheme name is case-insensitive.
fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, secret: &str, role: Role, practices: &[&str]) -> Token {
        Token {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            role,
            practices: practices.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn authenticator() -> Authenticator {
        let client = Client {
            name: "scanner".into(),
            subject_cn: Some("scanner.clinic".into()),
            dns_name: None,
            role: Role::Ingest,
            practices: ["p1".parse().unwrap()].into(),
        };
        Authenticator::new(
            &[
                token("a", "secret-a", Role::Reader, &["p1"]),
                token("b", "secret-b", Role::Ingest, &["p2"]),
            ],
            &[client],
        )
        .unwrap()
    }

    #[test]
    fn valid_tokens_map_to_principals() {
        let auth = authenticator();
        let name = |header: &[u8]| {
            auth.authenticate(Some(header), None)
                .unwrap()
                .name
                .to_string()
        };
        assert_eq!(name(b"Bearer secret-a"), "a");
        assert_eq!(name(b"bearer secret-b"), "b");
        assert_eq!(name(b"BEARER  secret-b "), "b");
    }

    #[test]
    fn invalid_credentials_are_unauthenticated() {
        let auth = authenticator();
        let cases: [Option<&[u8]>; 7] = [
            None,
            Some(b""),
            Some(b"Bearer "),
            Some(b"Bearer secret-c"),
            Some(b"Basic c2VjcmV0LWE="),
            Some(b"secret-a"),
            Some(b"Bearer secret-a2"),
        ];
        for case in cases {
            assert_eq!(
                auth.authenticate(case, None),
                Err(AuthError::Unauthenticated),
                "{case:?}"
            );
        }
    }

    #[test]
    fn certificate_maps_to_client() {
        let auth = authenticator();
        let names = CertificateNames {
            subject_cn: Some("scanner.clinic".into()),
            dns_names: vec![],
        };
        assert_eq!(
            auth.authenticate(None, Some(&names))
                .unwrap()
                .name
                .to_string(),
            "scanner"
        );
        let other = CertificateNames {
            subject_cn: Some("other".into()),
            dns_names: vec![],
        };
        assert_eq!(
            auth.authenticate(None, Some(&other)),
            Err(AuthError::Unauthenticated)
        );
        // A bearer header takes precedence, and a wrong one is not rescued by the certificate.
        assert_eq!(
            auth.authenticate(Some(b"Bearer nope"), Some(&names)),
            Err(AuthError::Unauthenticated)
        );
    }

    #[test]
    fn roles_grant_only_their_actions() {
        let actions = [
            Action::ObjectPut,
            Action::ObjectGet,
            Action::ObjectHead,
            Action::ObjectDelete,
            Action::CallList,
            Action::AuditQuery,
            Action::WebhookReceive,
        ];
        let granted: Vec<(Role, Vec<Action>)> =
            [Role::Ingest, Role::Reader, Role::Admin, Role::Auditor]
                .into_iter()
                .map(|role| {
                    (
                        role,
                        actions
                            .into_iter()
                            .filter(|action| permits(role, *action))
                            .collect(),
                    )
                })
                .collect();
        assert_eq!(granted[0].1, vec![Action::ObjectPut]);
        assert_eq!(
            granted[1].1,
            vec![Action::ObjectGet, Action::ObjectHead, Action::CallList]
        );
        assert_eq!(granted[2].1, vec![Action::ObjectDelete]);
        assert_eq!(granted[3].1, vec![Action::AuditQuery]);
    }

    #[test]
    fn other_practice_is_forbidden() {
        let auth = authenticator();
        let principal = auth
            .authenticate(Some(b"Bearer secret-a"), None)
            .unwrap()
            .clone();
        let p1: PracticeId = "p1".parse().unwrap();
        let p2: PracticeId = "p2".parse().unwrap();
        assert_eq!(auth.authorize(&principal, Action::ObjectGet, &p1), Ok(()));
        assert_eq!(
            auth.authorize(&principal, Action::ObjectGet, &p2),
            Err(AuthError::Forbidden)
        );
        assert_eq!(
            auth.authorize(&principal, Action::ObjectPut, &p1),
            Err(AuthError::Forbidden)
        );
    }
}
