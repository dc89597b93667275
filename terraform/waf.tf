# WAF in front of the ALB: AWS's IP reputation list, its known-bad-inputs rules (Log4Shell and
# other exploit patterns), its anonymous-IP list (counting only, see below) and a per-address
# rate limit. Not the AWS common rule set: its
# SizeRestrictions_BODY blocks bodies over 8 KB, and offers and answers (SDP) may be up to
# BEACH_ROAD_MAX_SDP_BYTES (32 KiB). WAF sees the HTTP calls and the WebSocket upgrade, not the
# frames of an open socket. The server's own per-address limits stay the finer ones; the rate
# rule only stops floods before they reach the instances.

locals {
  waf_log_group = "aws-waf-logs-${var.name}" # WAF requires the aws-waf-logs- prefix
}

resource "aws_wafv2_web_acl" "this" {
  name        = var.name
  description = "beach-road ${var.name}: IP reputation, known bad inputs, per-address rate limit"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  rule {
    name     = "aws-ip-reputation"
    priority = 10
    override_action {
      none {}
    }
    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesAmazonIpReputationList"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-ip-reputation"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "aws-known-bad-inputs"
    priority = 20
    override_action {
      none {}
    }
    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesKnownBadInputsRuleSet"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-known-bad-inputs"
      sampled_requests_enabled   = true
    }
  }

  # Tor exits, anonymizing VPNs and proxies, and hosting providers' addresses. Counted, not
  # blocked, by default: people run beach on cloud VMs and behind VPNs, and blocking hosting
  # providers would lock them out. Its CloudWatch metric and sampled requests show what it would
  # block; waf_block_anonymous_ips = true makes it block.
  rule {
    name     = "aws-anonymous-ip"
    priority = 25
    dynamic "override_action" {
      for_each = var.waf_block_anonymous_ips ? [] : [1]
      content {
        count {}
      }
    }
    dynamic "override_action" {
      for_each = var.waf_block_anonymous_ips ? [1] : []
      content {
        none {}
      }
    }
    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesAnonymousIpList"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-anonymous-ip"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "rate-per-address"
    priority = 30
    action {
      block {}
    }
    statement {
      rate_based_statement {
        limit              = var.waf_rate_limit_per_5min
        aggregate_key_type = "IP"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-rate-per-address"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = var.name
    sampled_requests_enabled   = true
  }
}

resource "aws_wafv2_web_acl_association" "alb" {
  resource_arn = aws_lb.this.arn
  web_acl_arn  = aws_wafv2_web_acl.this.arn
}

# Blocked requests only (allowed ones are in the ALB access logs), without the headers that may
# carry credentials.
resource "aws_cloudwatch_log_group" "waf" {
  #checkov:skip=CKV_AWS_338: WAF log lines carry client IP addresses (personal data): kept log_retention_days (default 30), not a year.
  name              = local.waf_log_group
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
}

data "aws_iam_policy_document" "waf_logs" {
  statement {
    sid       = "WafDeliversItsLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.waf.arn}:*"]
    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:*"]
    }
  }
}

resource "aws_cloudwatch_log_resource_policy" "waf" {
  policy_name     = "${var.name}-waf-logs"
  policy_document = data.aws_iam_policy_document.waf_logs.json
}

resource "aws_wafv2_web_acl_logging_configuration" "this" {
  resource_arn            = aws_wafv2_web_acl.this.arn
  log_destination_configs = [aws_cloudwatch_log_group.waf.arn]

  redacted_fields {
    single_header {
      name = "authorization"
    }
  }
  redacted_fields {
    single_header {
      name = "cookie"
    }
  }

  logging_filter {
    default_behavior = "DROP"
    filter {
      behavior    = "KEEP"
      requirement = "MEETS_ANY"
      condition {
        action_condition {
          action = "BLOCK"
        }
      }
    }
  }

  depends_on = [aws_cloudwatch_log_resource_policy.waf]
}
