//! The snapshot store: where snapshot files are kept, a local directory or S3-compatible
//! object storage (the `object_store` crate), by the `[snapshots]` location.

use crate::config::SnapshotConfig;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes read from a file per part of an upload (S3 wants at least 5 MiB per part).
const PART: usize = 8 << 20;

/// Where snapshot files are kept.
#[derive(Clone)]
pub struct SnapshotStore {
    objects: Arc<dyn ObjectStore>,
    /// Prepended to every object's name (an `s3://bucket/prefix` location's prefix).
    prefix: String,
    /// Where it is, for logs and errors.
    pub location: String,
}

impl SnapshotStore {
    pub fn open(config: &SnapshotConfig) -> Result<SnapshotStore, String> {
        let location = config.location.clone();
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("snapshots location {location:?}: no bucket"));
            }
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(&config.s3_region);
            if let Some(endpoint) = &config.s3_endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            let objects = builder.build().map_err(|e| format!("snapshots location {location:?}: {e}"))?;
            let prefix = prefix.trim_matches('/').to_string();
            return Ok(SnapshotStore { objects: Arc::new(objects), prefix, location });
        }
        std::fs::create_dir_all(&location)
            .map_err(|e| format!("creating the snapshots directory {location}: {e}"))?;
        shoal_engine::private::tighten(Path::new(&location)).map_err(|e| format!("{location}: {e}"))?;
        let objects = object_store::local::LocalFileSystem::new_with_prefix(&location)
            .map_err(|e| format!("snapshots directory {location}: {e}"))?;
        Ok(SnapshotStore { objects: Arc::new(objects), prefix: String::new(), location })
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Stores the file at `from` as `name`.
    pub async fn upload(&self, name: &str, from: &Path) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("storing snapshot {name} in {}: {e}", self.location);
        let mut file = tokio::fs::File::open(from).await.map_err(|e| err(&e))?;
        let upload = self.objects.put_multipart(&self.path(name)).await.map_err(|e| err(&e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0; PART];
        loop {
            let n = file.read(&mut buf).await.map_err(|e| err(&e))?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await.map_err(|e| err(&e))?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| err(&e))?;
        Ok(())
    }

    /// Copies object `name` to the file `to`.
    pub async fn download(&self, name: &str, to: &Path) -> Result<u64, String> {
        let err = |e: &dyn std::fmt::Display| format!("reading snapshot {name} from {}: {e}", self.location);
        let mut stream = self.objects.get(&self.path(name)).await.map_err(|e| err(&e))?.into_stream();
        let mut file = tokio::fs::File::create(to).await.map_err(|e| err(&e))?;
        let mut total = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| err(&e))?;
            total += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| err(&e))?;
        }
        file.flush().await.map_err(|e| err(&e))?;
        Ok(total)
    }

    /// Removes object `name` (gone already is fine).
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        match self.objects.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("deleting snapshot {name} from {}: {e}", self.location)),
        }
    }
}
