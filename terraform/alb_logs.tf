# ALB access logs: one object per ALB node every 5 minutes, into a private bucket of this stack.

# The ELB account of the region (regions before August 2022); newer regions deliver as the
# logdelivery.elasticloadbalancing service principal instead. The policy allows both.
data "aws_elb_service_account" "this" {}

locals {
  alb_log_prefix = "alb"
}

resource "aws_s3_bucket" "alb_logs" {
  #checkov:skip=CKV_AWS_145: ALB access log delivery supports SSE-S3 (AES256) only, not SSE-KMS; the bucket is encrypted with SSE-S3 below.
  #checkov:skip=CKV_AWS_18: this bucket holds access logs itself; server access logging of the log bucket would need yet another bucket (and that one its own), for objects only the ELB service writes.
  #checkov:skip=CKV_AWS_144: no cross-region replication: access logs are diagnostics with a retention of alb_log_retention_days, not data whose loss in one region matters; replication would double their cost.
  #checkov:skip=CKV2_AWS_62: no event notifications: nothing consumes new log objects as they arrive (query them with Athena when needed).
  bucket_prefix = "${var.name}-alb-logs-"
  force_destroy = false
}

resource "aws_s3_bucket_public_access_block" "alb_logs" {
  bucket                  = aws_s3_bucket.alb_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# No ACLs: the bucket owner owns every object (the ELB service delivers under the bucket policy).
resource "aws_s3_bucket_ownership_controls" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Logs expire after alb_log_retention_days; versioning keeps an overwritten or deleted object a
# week longer (a mistaken delete can be undone), and failed uploads are cleaned up.
resource "aws_s3_bucket_lifecycle_configuration" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.alb_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.alb_logs]
}

data "aws_iam_policy_document" "alb_logs" {
  # Regions available before August 2022: the region's ELB account writes the logs.
  statement {
    sid       = "ElbAccountDeliversAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.alb_logs.arn}/${local.alb_log_prefix}/AWSLogs/${local.account_id}/*"]
    principals {
      type        = "AWS"
      identifiers = [data.aws_elb_service_account.this.arn]
    }
  }

  # Newer regions: the log delivery service principal, for this account's load balancers only.
  statement {
    sid       = "LogDeliveryServiceDeliversAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.alb_logs.arn}/${local.alb_log_prefix}/AWSLogs/${local.account_id}/*"]
    principals {
      type        = "Service"
      identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  # Nothing reaches the bucket without TLS.
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.alb_logs.arn, "${aws_s3_bucket.alb_logs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id
  policy = data.aws_iam_policy_document.alb_logs.json

  depends_on = [aws_s3_bucket_public_access_block.alb_logs]
}
