"""PLACEHOLDER (to be replaced by the Customer.io destination work): registers nothing."""
