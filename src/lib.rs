//! connection-operator: a Kubernetes operator that manages teams' connections to CRM systems
//! (Salesforce Production and Sandbox orgs, Microsoft Dynamics 365 environments).

pub mod api;
mod check_credentials;
pub mod cli;
pub mod controller;
pub mod crm;
pub mod events;
pub mod jobruns;
pub mod kube_client;
pub mod plugin;
pub mod providers;
pub mod retriever;
pub mod worker;
