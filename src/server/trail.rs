//! The audit records of one request: the authorization decision before anything is read or
//! written, and the completion after.
//!
//! Both records go through [`AuditLog::append`], which returns only once the record is durable.
//! If it fails, the request fails with 503 before any plaintext leaves and before any write
//! commits. A streamed response writes its completion record when the stream ends, however it
//! ends ([`StreamCompletion`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::error;

use super::ApiError;
use crate::audit::{
    Access, Action, AuditLog, ByteRange, Outcome, PrincipalName, Reason, RequestId, Role,
    TlsVersion,
};
use crate::auth::{AuthError, Principal};
use crate::ids::{ArtifactName, CallId, PracticeId};

/// The audit context of one request.
pub struct Trail {
    log: Arc<AuditLog>,
    access: Access,
}

impl Trail {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: Arc<AuditLog>,
        request_id: &RequestId,
        action: Action,
        practice: PracticeId,
        call: Option<CallId>,
        artifact: Option<ArtifactName>,
        client: SocketAddr,
        tls_version: TlsVersion,
    ) -> Self {
        let access = Access {
            request_id: request_id.clone(),
            principal: None,
            role: None,
            action,
            practice,
            call,
            artifact,
            client,
            tls_version,
            range: None,
        };
        Trail { log, access }
    }

    /// Sets the authenticated principal, so that a denial of its request names it.
    pub fn identify(&mut self, principal: &Principal) {
        self.access.principal = Some(principal.name.clone());
        self.access.role = Some(principal.role);
    }

    /// Records the authorization decision. A denial is recorded and then returned as the
    /// request's error.
    pub async fn authorize(
        &mut self,
        decision: Result<&Principal, AuthError>,
    ) -> Result<(), ApiError> {
        match decision {
            Ok(principal) => {
                self.access.principal = Some(principal.name.clone());
                self.access.role = Some(principal.role);
                self.append(Outcome::Allowed).await
            }
            Err(denial) => {
                self.append(Outcome::Denied {
                    reason: Reason::new(denial.reason()),
                })
                .await?;
                Err(denial.into())
            }
        }
    }

    /// Records the authorization of a request authenticated by other means (a webhook's
    /// signature), under `principal`.
    pub async fn allow_as(
        &mut self,
        principal: PrincipalName,
        role: Option<Role>,
    ) -> Result<(), ApiError> {
        self.access.principal = Some(principal);
        self.access.role = role;
        self.append(Outcome::Allowed).await
    }

    /// Records a denial that happened before any principal was known.
    pub async fn deny(&mut self, reason: &'static str) -> Result<(), ApiError> {
        self.append(Outcome::Denied {
            reason: Reason::new(reason),
        })
        .await
    }

    pub fn set_call(&mut self, call: CallId) {
        self.access.call = Some(call);
    }

    /// Sets the byte range a read served, for the completion record.
    pub fn set_range(&mut self, range: &std::ops::Range<u64>) {
        if range.end > range.start {
            self.access.range = Some(ByteRange {
                first: range.start,
                last: range.end - 1,
            });
        }
    }

    /// Records the completion of a request whose response was sent in one piece.
    pub async fn complete(
        &self,
        status: u16,
        bytes: u64,
        error: Option<&ApiError>,
    ) -> Result<(), ApiError> {
        let outcome = match error {
            None => Outcome::Ok { status, bytes },
            Some(error) => Outcome::Error {
                status,
                bytes,
                reason: Reason::new(error.reason()),
            },
        };
        self.append(outcome).await
    }

    /// Hands the completion record to a response stream, which writes it when it ends.
    pub fn stream_completion(self, status: u16) -> StreamCompletion {
        StreamCompletion {
            trail: Some(self),
            status,
            bytes: 0,
            finished: false,
        }
    }

    async fn append(&self, outcome: Outcome) -> Result<(), ApiError> {
        match self.log.append(&self.access, outcome).await {
            Ok(_) => Ok(()),
            Err(failure) => {
                error!(error = %failure, request_id = %self.access.request_id, "audit record not written; failing the request");
                Err(ApiError::AuditUnavailable)
            }
        }
    }
}

/// The completion record of a streamed response: counts the bytes sent and writes the record
/// when dropped, `ok` if the stream reached its verified end and `error` otherwise.
pub struct StreamCompletion {
    trail: Option<Trail>,
    status: u16,
    bytes: u64,
    finished: bool,
}

impl StreamCompletion {
    pub fn sent(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamCompletion {
    fn drop(&mut self) {
        let Some(trail) = self.trail.take() else {
            return;
        };
        let outcome = if self.finished {
            Outcome::Ok {
                status: self.status,
                bytes: self.bytes,
            }
        } else {
            Outcome::Error {
                status: self.status,
                bytes: self.bytes,
                reason: Reason::new("aborted"),
            }
        };
        // The response is gone; a failed record is logged and counted by the audit log itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = trail.append(outcome).await;
            });
        }
    }
}
