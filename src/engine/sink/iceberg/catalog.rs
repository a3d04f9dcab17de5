//! The catalog (a SQL catalog in PostgreSQL) and the warehouse's storage (`file://` or `s3://`).

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::io::{
    S3_ACCESS_KEY_ID, S3_ENDPOINT, S3_PATH_STYLE_ACCESS, S3_REGION, S3_SECRET_ACCESS_KEY,
};
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalog, SqlCatalogBuilder};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;

use super::error::IcebergError;
use super::fence::CatalogFence;
use crate::engine::config::IcebergConfig;

/// The catalog name in the SQL catalog's tables (`catalog_name`); readers such as pyiceberg's
/// `SqlCatalog("philotes", ...)` use the same.
pub const CATALOG_NAME: &str = "philotes";

/// Storage properties of the warehouse (S3 endpoint, region, credentials).
pub fn storage_props(cfg: &IcebergConfig) -> HashMap<String, String> {
    let mut props = HashMap::new();
    if let Some(s3) = &cfg.s3 {
        if let Some(e) = &s3.endpoint {
            props.insert(S3_ENDPOINT.to_string(), e.clone());
        }
        props.insert(S3_REGION.to_string(), s3.region.clone());
        props.insert(S3_PATH_STYLE_ACCESS.to_string(), s3.path_style.to_string());
        if let Some((id, key)) = &s3.credentials {
            props.insert(S3_ACCESS_KEY_ID.to_string(), id.clone());
            props.insert(S3_SECRET_ACCESS_KEY.to_string(), key.clone());
        }
    }
    props
}

/// Connects to the SQL catalog (creating its tables when missing) and makes sure the namespace
/// exists. `fence` names the writer on every catalog connection (see [`super::fence`]).
pub async fn connect(
    cfg: &IcebergConfig,
    fence: Option<&CatalogFence>,
) -> Result<Arc<SqlCatalog>, IcebergError> {
    let mut props = storage_props(cfg);
    // A pipeline commits one table at a time.
    props.insert("pool.max-connections".into(), "2".into());
    let uri = cfg.catalog.sqlx_uri()?;
    let catalog = SqlCatalogBuilder::default()
        .uri(match fence {
            Some(f) => f.uri(&uri),
            None => uri,
        })
        .warehouse_location(cfg.warehouse.clone())
        .sql_bind_style(SqlBindStyle::DollarNumeric)
        .with_storage_factory(Arc::new(OpenDalResolvingStorageFactory::new()))
        .load(CATALOG_NAME, props)
        .await
        .map_err(IcebergError::iceberg(format!(
            "connecting to the Iceberg SQL catalog in {}",
            cfg.catalog
        )))?;
    let ns = NamespaceIdent::new(cfg.namespace.clone());
    let exists = catalog
        .namespace_exists(&ns)
        .await
        .map_err(IcebergError::iceberg("looking up the Iceberg namespace"))?;
    if !exists {
        match catalog.create_namespace(&ns, HashMap::new()).await {
            Ok(_) => {}
            // Created meanwhile by another pipeline.
            Err(e) if e.kind() == iceberg::ErrorKind::NamespaceAlreadyExists => {}
            Err(e) => {
                return Err(IcebergError::Iceberg {
                    context: format!("creating Iceberg namespace {}", cfg.namespace),
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(Arc::new(catalog))
}
