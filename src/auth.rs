//! Authentication and authorization of data-listener requests.
//!
//! Clients present `Authorization: Bearer <token>`. Only the SHA-256 of each token is configured.
//! The presented token is hashed and compared with every configured hash in constant time. The
//! loop never exits early, so timing reveals neither which token matched nor how much of it.
//! A principal may act only on its own practices.
//!
//! NOTE: every principal may upload and read. Roles (ingest, reader, admin, auditor) and mTLS
//! principals belong here, behind [`Authenticator::authorize`], which already receives the
//! action.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::Token;
use crate::ids::PracticeId;

/// The identity a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name; safe to log.
    pub name: String,
    pub practices: BTreeSet<PracticeId>,
}

/// The operation a request performs, so authorization can depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Upload,
    Read,
}

/// Why a request was refused: 401 for [`AuthError::Unauthenticated`], 403 for
/// [`AuthError::Forbidden`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("the token is not allowed to access this practice")]
    Forbidden,
}

/// Matches presented bearer tokens against the configured token hashes.
pub struct Authenticator {
    tokens: Vec<(Principal, [u8; 32])>,
}

impl Authenticator {
    pub fn new(tokens: &[Token]) -> Self {
        let tokens = tokens
            .iter()
            .map(|token| {
                let principal = Principal {
                    name: token.name.clone(),
                    practices: token.practices.clone(),
                };
                (principal, token.sha256)
            })
            .collect();
        Authenticator { tokens }
    }

    /// Finds the principal for an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<&Principal, AuthError> {
        let token = authorization
            .and_then(|value| strip_bearer(value))
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

    /// Checks that `principal` may perform `action` on `practice`.
    pub fn authorize(
        &self,
        principal: &Principal,
        _action: Action,
        practice: &PracticeId,
    ) -> Result<(), AuthError> {
        if principal.practices.contains(practice) {
            Ok(())
        } else {
            Err(AuthError::Forbidden)
        }
    }
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

    fn token(name: &str, secret: &str, practices: &[&str]) -> Token {
        Token {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            practices: practices.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(&[
            token("a", "secret-a", &["p1"]),
            token("b", "secret-b", &["p2"]),
        ])
    }

    #[test]
    fn valid_tokens_map_to_principals() {
        let auth = authenticator();
        assert_eq!(
            auth.authenticate(Some(b"Bearer secret-a")).unwrap().name,
            "a"
        );
        assert_eq!(
            auth.authenticate(Some(b"bearer secret-b")).unwrap().name,
            "b"
        );
        assert_eq!(
            auth.authenticate(Some(b"BEARER  secret-b ")).unwrap().name,
            "b"
        );
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
                auth.authenticate(case),
                Err(AuthError::Unauthenticated),
                "{case:?}"
            );
        }
    }

    #[test]
    fn other_practice_is_forbidden() {
        let auth = authenticator();
        let principal = auth.authenticate(Some(b"Bearer secret-a")).unwrap().clone();
        let p1: PracticeId = "p1".parse().unwrap();
        let p2: PracticeId = "p2".parse().unwrap();
        assert_eq!(auth.authorize(&principal, Action::Read, &p1), Ok(()));
        assert_eq!(
            auth.authorize(&principal, Action::Upload, &p2),
            Err(AuthError::Forbidden)
        );
    }
}
