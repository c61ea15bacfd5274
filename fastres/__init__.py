"""fastres"""
