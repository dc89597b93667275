# One customer-managed key for what this stack encrypts at rest: the two Secrets Manager secrets,
# Redis (at rest), the CloudWatch Logs groups (instances, WAF) and the alarm topic. Not the ALB access log
# bucket: ALB log delivery supports SSE-S3 only (see alb_logs.tf).

data "aws_caller_identity" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  dns_suffix = data.aws_partition.current.dns_suffix
  log_group  = "/beach-road/${var.name}"
}

resource "aws_kms_key" "this" {
  description             = "beach-road ${var.name}: secrets, Redis at rest, logs, alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  # A key policy, not aws_iam_policy_document: in a key policy "Resource": "*" means this key.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        # The account administers the key through IAM (the default key policy). Secrets Manager
        # and ElastiCache use the key on behalf of their callers (the instance role's kms:Decrypt
        # is scoped to Secrets Manager, see main.tf).
        Sid       = "AccountAdministersThroughIAM"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        # The instances' and the WAF's log groups, and only them.
        Sid       = "CloudWatchLogsForTheStackLogGroups"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.${local.dns_suffix}" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnEquals = {
            "kms:EncryptionContext:aws:logs:arn" = [
              "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:${local.log_group}",
              "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:${local.waf_log_group}",
            ]
          }
        }
      },
      {
        # CloudWatch alarms of this account publishing to the encrypted topic.
        Sid       = "CloudWatchAlarmsPublishToTheTopic"
        Effect    = "Allow"
        Principal = { Service = "cloudwatch.amazonaws.com" }
        Action    = ["kms:Decrypt", "kms:GenerateDataKey*"]
        Resource  = "*"
        Condition = {
          StringEquals = { "aws:SourceAccount" = local.account_id }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
