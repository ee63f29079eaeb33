// tests are written next
