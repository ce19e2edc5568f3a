"""Input and output at the edge of the pipeline: the image fetcher, its URL/address policy, and
content-addressed blob storage (local directory or S3). No database, no models."""
