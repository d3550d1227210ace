//! ssp-gateway: an mTLS interoperability gateway in the style of the NHS Spine Secure Proxy.

pub mod directory;
pub mod mock_provider;
pub mod ssp;
pub mod tls;
