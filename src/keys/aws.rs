//! AWS clients: credentials and region from the standard chain (environment, profile, web
//! identity, instance metadata), an optional endpoint override, and an optional role per
//! practice for keys in the practice's own account, always assumed with an external id.
//!
//! HTTPS to AWS uses rustls with the *ring* provider, like the rest of callseal. Every KMS call
//! has connect, attempt and operation timeouts, so an unreachable KMS fails a request in seconds
//! instead of holding it open.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use super::kms::arn_region;
use crate::config::{AwsSettings, KmsKey};

/// Loads the shared AWS configuration from the standard chain.
pub async fn load_config(settings: &AwsSettings) -> SdkConfig {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .operation_attempt_timeout(Duration::from_secs(settings.attempt_timeout_secs))
        .operation_timeout(Duration::from_secs(settings.operation_timeout_secs))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts))
        .timeout_config(timeouts);
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader.load().await
}

/// Builds the KMS client of one practice's key: in the key's region, through the endpoint
/// override if one is set, with the practice's role assumed if it has one.
pub async fn kms_client(
    base: &SdkConfig,
    settings: &AwsSettings,
    key: &KmsKey,
) -> aws_sdk_kms::Client {
    let region = arn_region(&key.arn).map(|region| Region::new(region.to_owned()));
    let mut builder = aws_sdk_kms::config::Builder::from(base);
    if let Some(region) = &region {
        builder = builder.region(region.clone());
    }
    if let Some(endpoint) = &settings.kms_endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    if let Some(role) = &key.role {
        let mut provider = AssumeRoleProvider::builder(&role.arn)
            .external_id(&role.external_id)
            .session_name("callseal")
            .configure(base);
        if let Some(region) = region {
            provider = provider.region(region);
        }
        builder = builder.credentials_provider(provider.build().await);
    }
    aws_sdk_kms::Client::from_conf(builder.build())
}
