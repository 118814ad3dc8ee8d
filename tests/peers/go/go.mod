module toolgate.test/gopeer

go 1.19
