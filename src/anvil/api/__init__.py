"""HTTP: the S3 gateway and the native API; nothing but translation and authorisation."""
