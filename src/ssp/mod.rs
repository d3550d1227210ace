//! The SSP envelope: parsing the request target and Ssp-* headers, the interaction catalogue,
//! the JWT policy, and the OperationOutcome the gateway answers with. Pure functions only.

pub mod envelope;
pub mod interactions;
pub(crate) mod json;
pub mod jwt;
pub mod outcome;
